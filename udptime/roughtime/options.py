"""Roughtime on the command line: options, their checks, and what they make.

For the tap (``udptime.tap``), as for NTS::

    optParameters = [..., *ROUGHTIME_OPT_PARAMETERS]
    Config(..., roughtime=roughtime_config(options, listeners))

    services, settings = roughtime_services(config, reactor)
    Context(..., roughtime=settings)        # the responders' key source
    attach(top, services, ...)              # timer, SIGHUP reload, summaries
    UdptimeCollector(..., families=metric_families(top.listeners, services))

Roughtime is on exactly when a ``roughtime@`` listener is. An unsynchronised
kernel clock is served only under ``--local-stratum``, the switch that makes
NTP serve one, with the radius ``--roughtime-radius`` claims.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from udptime.clockstate import KernelClock, read_kernel_clock
from udptime.config import (
    Config,
    RoughtimeConfig,
    coerce,
    parse_file_name,
    parse_positive,
)
from udptime.listenspec import ListenSpec
from udptime.roughtime import keys
from udptime.roughtime.responder import (
    BATCH_BUCKETS,
    ClockState,
    RoughtimeCounters,
    RoughtimeResponder,
    RoughtimeSettings,
)
from udptime.roughtime.service import KeyService, SummaryLines, iso

FORMAT = "roughtime"
#: RADI claimed for an unsynchronised clock served under --local-stratum,
#: unless --roughtime-radius says otherwise.
DEFAULT_LOCAL_RADIUS = 10

ROUGHTIME_OPT_PARAMETERS: list[list[Any]] = [
    [
        "roughtime-key",
        None,
        None,
        (
            "Roughtime: the root (long-term) private key, PEM, mode 0600 "
            "('udptime roughtime keygen'). The server makes and renews its own "
            "day-long delegations from it. For a single host; a fleet keeps the "
            "root key offline and gives each host --roughtime-delegation."
        ),
        coerce("--roughtime-key", parse_file_name),
    ],
    [
        "roughtime-delegation",
        None,
        None,
        (
            "Roughtime: a delegation file ('udptime roughtime delegate'): an "
            "online key the offline root key vouches for until MAXT. Warned "
            "about a week ahead, not served once expired; re-read on SIGHUP."
        ),
        coerce("--roughtime-delegation", parse_file_name),
    ],
    [
        "roughtime-radius",
        None,
        None,
        (
            "Roughtime: radius in seconds claimed for an unsynchronised clock "
            f"served under --local-stratum (default {DEFAULT_LOCAL_RADIUS}). A "
            "synchronised clock claims the kernel's maximum error (at least 3 s)."
        ),
        coerce("--roughtime-radius", parse_positive),
    ],
]


def roughtime_config(
    options: Mapping[str, Any], listeners: Sequence[ListenSpec]
) -> RoughtimeConfig | None:
    """The Roughtime part of the config from coerced options, or ``None``.

    Refuses settings that cannot work together and key files that cannot be
    read or trusted, with the message twistd prints.
    """
    key, delegation = options["roughtime-key"], options["roughtime-delegation"]
    radius, local_stratum = options["roughtime-radius"], options["local-stratum"]
    if not any(spec.format == FORMAT for spec in listeners):
        given = [
            f"--{name}"
            for name in ("roughtime-key", "roughtime-delegation", "roughtime-radius")
            if options[name] is not None
        ]
        if given:
            raise usage.UsageError(
                f"{', '.join(given)}: only used with a roughtime listener "
                "(--listen roughtime@[HOST:]PORT)"
            )
        return None
    if key is not None and delegation is not None:
        raise usage.UsageError(
            "--roughtime-key, --roughtime-delegation: give one of them, not both"
        )
    if key is None and delegation is None:
        raise usage.UsageError(
            "--listen roughtime@...: needs --roughtime-key ROOT.pem (one host) or "
            "--roughtime-delegation FILE (a fleet host)"
        )
    if radius is not None and local_stratum is None:
        raise usage.UsageError(
            "--roughtime-radius: only used with --local-stratum (serving an "
            "unsynchronised clock)"
        )
    try:
        if key is not None:
            keys.load_root_key(Path(key))
        else:
            loaded = keys.load_delegation(Path(delegation))
            if loaded.maxt < time.time():
                raise keys.KeyFileError(f"{delegation} expired at {iso(loaded.maxt)}")
    except keys.KeyFileError as exc:
        option = "--roughtime-key" if key is not None else "--roughtime-delegation"
        raise usage.UsageError(f"{option}: {exc}") from None
    local_radius = None
    if local_stratum is not None:
        local_radius = radius if radius is not None else DEFAULT_LOCAL_RADIUS
    return RoughtimeConfig(
        key_file=key, delegation_file=delegation, local_radius=local_radius
    )


def kernel_clock_state(
    read: Callable[[], KernelClock | None] = read_kernel_clock,
) -> ClockState:
    """What the responder needs of the kernel clock: synchronised, and the
    maximum error in microseconds; ``None`` when it cannot be read."""
    kernel = read()
    if kernel is None:
        return None
    return kernel.synchronised, kernel.maxerror


def roughtime_services(
    config: Config, clock: IReactorTime
) -> tuple[list[KeyService], RoughtimeSettings | None]:
    """The key service and what responders read, or ``([], None)`` when off.

    The key file is read here, while still privileged; one that cannot be
    used is one line on stderr and exit status 1.
    """
    rt = config.roughtime
    if rt is None:
        return [], None
    try:
        if rt.key_file is not None:
            keys_ = KeyService.from_root(keys.load_root_key(Path(rt.key_file)), clock)
        else:
            assert rt.delegation_file is not None
            keys_ = KeyService.from_file(rt.delegation_file, clock)
    except keys.KeyFileError as exc:
        sys.stderr.write(f"udptime: Roughtime key: {exc}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    keys_.setName("roughtime-keys")  # type: ignore[no-untyped-call]
    settings = RoughtimeSettings(
        keys_.holder, kernel_clock_state, local_radius=rt.local_radius
    )
    return [keys_], settings


def responders(listeners: Sequence[Any]) -> list[tuple[Any, RoughtimeResponder]]:
    """(stats, responder) of every listener that answers Roughtime."""
    found = []
    for listener in listeners:
        responder = listener.protocol.core.responder
        if isinstance(responder, RoughtimeResponder):
            found.append((listener.stats, responder))
    return found


def attach(top: Any, services: Sequence[KeyService]) -> None:
    """Start the key service with *top* and let SIGHUP reload a delegation file."""
    for keys_ in services:
        keys_.setServiceParent(top)  # type: ignore[no-untyped-call]
        if keys_.path is not None and top.signals is not None:
            top.signals.reloaders["Roughtime delegation"] = keys_.reload


def summary_lines(
    listeners: Sequence[Any], services: Sequence[KeyService]
) -> list[Callable[[float], None]]:
    """Roughtime's own summary lines, for the summary service's ``also``."""
    if not services:
        return []

    def named() -> list[tuple[str, RoughtimeCounters]]:
        return [
            (f"{stats.address} port {stats.port}", responder.counters)
            for stats, responder in responders(listeners)
        ]

    return [SummaryLines(named)]


#: Why a request got no reply, as ``udptime_roughtime_unanswered_total`` labels.
UNANSWERED = (
    "too_small",
    "malformed",
    "unsupported_version",
    "wrong_server",
    "unsynchronised",
    "expired",
    "not_yet_valid",
    "oversized",
)


def metric_families(
    listeners: Sequence[Any], services: Sequence[KeyService]
) -> Callable[[], Iterator[Any]]:
    """Roughtime's metric families for ``UdptimeCollector``, read on scrape."""

    def families() -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        from udptime.metrics import LABELS

        found = responders(listeners)
        if not found and not services:
            return
        signatures = CounterMetricFamily(
            "udptime_roughtime_signatures",
            "Roughtime SREP signatures made (one per batch of up to 1024 replies).",
            labels=LABELS,
        )
        batches = HistogramMetricFamily(
            "udptime_roughtime_batch_size",
            "Roughtime requests answered under one signature (one Merkle tree).",
            labels=LABELS,
        )
        unanswered = CounterMetricFamily(
            "udptime_roughtime_unanswered",
            "Roughtime requests left unanswered, by reason.",
            labels=[*LABELS, "reason"],
        )
        for stats, responder in found:
            labels = stats.labels()
            counters = responder.counters
            signatures.add_metric(labels, counters.signatures)
            cumulative, running = [], 0
            for bound, count in zip(
                (*BATCH_BUCKETS, "+Inf"), responder.batch_sizes, strict=True
            ):
                running += count
                cumulative.append((str(bound), float(running)))
            batches.add_metric(labels, cumulative, float(counters.batch_leaves))
            for reason in UNANSWERED:
                unanswered.add_metric([*labels, reason], getattr(counters, reason))
        yield signatures
        yield batches
        yield unanswered
        for keys_ in services:
            yield GaugeMetricFamily(
                "udptime_roughtime_delegation_expiry_timestamp_seconds",
                "MAXT of the delegation the server signs with (POSIX seconds).",
                value=keys_.delegation.maxt,
            )
            yield GaugeMetricFamily(
                "udptime_roughtime_delegation_start_timestamp_seconds",
                "MINT of the delegation the server signs with (POSIX seconds).",
                value=keys_.delegation.mint,
            )

    return families
