"""Every format udptime serves, in one table.

A format is a pure wire module plus a responder (``udptime.core.Responder``);
adding one is a row here and nothing on the datagram path. Nothing registers
itself on import.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from udptime.core import Responder
from udptime.formats import encode_ctime, encode_daytime, encode_time
from udptime.ntp import ServerState
from udptime.nts.responder import CookieJar, NtsResponder
from udptime.responders.ntp import NtpResponder
from udptime.responders.text import TextResponder
from udptime.roughtime.responder import RoughtimeSettings


@dataclass(frozen=True)
class Context:
    """What responder factories may use, made once by the wiring.

    *wall_clock_ns* is POSIX nanoseconds (the transmit stamp); *clock_state*
    returns what NTP replies advertise (``udptime.clockstate`` in service,
    a plain value in tests); *nts_cookies* is set when NTS is on;
    *roughtime* (keys, kernel clock, radius) when a roughtime listener is.
    """

    wall_clock_ns: Callable[[], int]
    clock_state: Callable[[], ServerState]
    nts_cookies: CookieJar | None = None
    roughtime: RoughtimeSettings | None = None


@dataclass(frozen=True)
class Format:
    """A named reply format and how to make its responder.

    ``receive_timestamps``: the shell should ask the kernel for each
    datagram's receive time (``SO_TIMESTAMPNS``) rather than read a clock.
    """

    name: str
    summary: str
    make_responder: Callable[[Context], Responder]
    receive_timestamps: bool = False


def _ntp(context: Context) -> Responder:
    ntp = NtpResponder(context.clock_state, context.wall_clock_ns)
    if context.nts_cookies is None:
        return ntp
    return NtsResponder(ntp, context.nts_cookies, perf_ns=time.perf_counter_ns)


def _roughtime(context: Context) -> Responder:
    if context.roughtime is None:
        raise ValueError("roughtime needs a root key or a delegation")
    return context.roughtime.make_responder()


FORMATS: Mapping[str, Format] = MappingProxyType(
    {
        f.name: f
        for f in (
            Format(
                "ctime",
                "time.ctime() text in local time, as the recipe's server",
                lambda context: TextResponder(encode_ctime),
            ),
            Format(
                "daytime",
                "RFC 867 daytime: RFC 3339 UTC line ending in CRLF",
                lambda context: TextResponder(encode_daytime),
            ),
            Format(
                "time",
                "RFC 868 time: 32-bit big-endian seconds since 1900, mod 2**32",
                lambda context: TextResponder(encode_time),
            ),
            Format(
                "ntp",
                "NTPv4/SNTP server mode (RFC 5905, RFC 4330) from the kernel clock",
                _ntp,
                receive_timestamps=True,
            ),
            Format(
                "roughtime",
                "Roughtime (RFC 10049): signed time, one signature per batch",
                _roughtime,
            ),
        )
    }
)


def get_format(name: str) -> Format:
    """The format called *name*; ``KeyError`` names the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise KeyError(
            f"unknown format {name!r} (known: {', '.join(format_names())})"
        ) from None


def format_names() -> list[str]:
    return sorted(FORMATS)
