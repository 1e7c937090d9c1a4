"""The Roughtime shell: the delegation's owner on a timer, and summary lines.

The responders read one attribute, ``DelegationHolder.delegation`` (an
immutable :class:`~udptime.roughtime.keys.Delegation`); only
:class:`KeyService` replaces it, never on the datagram path:

* Given the root key (the one-host case), it makes its own short
  delegations, a fresh online key each time, and renews them when half
  their life is gone: a stolen online key is worth a day at most.
* Given a delegation file (a fleet host, whose root key stays offline), it
  serves under it, warns (at most hourly) once MAXT is less than
  ``warn_ahead`` away, and says when it has expired: the responders then
  answer nobody (they count ``expired``) until a new file is installed and
  SIGHUP reloads it (:meth:`KeyService.reload`).

Wall-clock seconds come from the injected clock (``IReactorTime``): MINT and
MAXT are POSIX times that mean the same on every host.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from udptime.logthrottle import LogThrottle
from udptime.roughtime import keys
from udptime.roughtime.keys import Delegation
from udptime.roughtime.responder import DelegationHolder, RoughtimeCounters

HOUR = 3_600
DAY = 86_400
#: Life of the delegations made from the root key; renewed at half of it.
SELF_LIFETIME = DAY
#: MINT of a self-made delegation lies this far back, for hosts (and
#: clients) whose clocks are a little behind.
SELF_BACKDATE = HOUR
#: A delegation file closer than this to its MAXT is warned about.
WARN_AHEAD = 7 * DAY
#: Seconds between looks at the delegation.
CHECK_INTERVAL = 60.0
#: Warnings about the same delegation repeat at most this often.
WARN_INTERVAL = float(HOUR)


def iso(seconds: int) -> str:
    """POSIX seconds as RFC 3339 UTC, for log lines."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return str(seconds)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class KeyService(service.Service):
    """Keeps ``holder.delegation`` one the responders may sign with.

    Make it with :meth:`from_root` or :meth:`from_file`; both leave a
    delegation in the holder at once, so responders can be built before
    the service starts.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        delegation: Delegation,
        *,
        root: Ed25519PrivateKey | None = None,
        path: str | None = None,
        lifetime: int = SELF_LIFETIME,
        warn_ahead: int = WARN_AHEAD,
        interval: float = CHECK_INTERVAL,
    ) -> None:
        if (root is None) == (path is None):
            raise ValueError("a key service has a root key or a delegation file")
        self.clock = clock
        self.holder = DelegationHolder(delegation)
        self.root = root
        self.path = path
        self.lifetime = lifetime
        self.warn_ahead = warn_ahead
        self.interval = interval
        #: Delegations made from the root key since start, the first included.
        self.renewals = 0 if root is None else 1
        #: Delegation files loaded by SIGHUP.
        self.reloads = 0
        self._loop: LoopingCall | None = None
        self._warnings = LogThrottle(clock, limit=1, interval=WARN_INTERVAL)

    @classmethod
    def from_root(
        cls,
        root: Ed25519PrivateKey,
        clock: IReactorTime,
        *,
        lifetime: int = SELF_LIFETIME,
        interval: float = CHECK_INTERVAL,
    ) -> KeyService:
        first = _self_delegation(root, int(clock.seconds()), lifetime)
        return cls(clock, first, root=root, lifetime=lifetime, interval=interval)

    @classmethod
    def from_file(
        cls,
        path: str,
        clock: IReactorTime,
        *,
        warn_ahead: int = WARN_AHEAD,
        interval: float = CHECK_INTERVAL,
    ) -> KeyService:
        """Raises :class:`~udptime.roughtime.keys.KeyFileError` for a file
        that cannot be read or trusted."""
        delegation = keys.load_delegation(Path(path))
        return cls(
            clock, delegation, path=path, warn_ahead=warn_ahead, interval=interval
        )

    @property
    def delegation(self) -> Delegation:
        return self.holder.delegation

    @property
    def public_key(self) -> bytes:
        """The root public key clients pin (it never changes while serving)."""
        return self.holder.delegation.root_public_key

    # -- the service -------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        d = self.delegation
        self.log.info(
            "Roughtime: public key {public_key}, online key {online} valid "
            "{mint} .. {maxt} ({source})",
            public_key=_b64(d.root_public_key),
            online=_b64(keys.public_bytes(d.online_key)),
            mint=iso(d.mint),
            maxt=iso(d.maxt),
            source="made from the root key" if self.root is not None else self.path,
        )
        loop = LoopingCall(self._tick_safely)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=True)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()  # type: ignore[no-untyped-call]

    # -- the timer ---------------------------------------------------------------

    def _tick_safely(self) -> None:
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - a bug must not stop the timer
            self.log.failure("Roughtime: key check failed")

    def tick(self) -> None:
        """Renew a self-made delegation when due; warn about a file's."""
        now = int(self.clock.seconds())
        if self.root is not None:
            self._renew_if_due(now)
        else:
            self._check_file_delegation(now)

    def _renew_if_due(self, now: int) -> None:
        assert self.root is not None
        d = self.delegation
        if now < d.mint or d.maxt - now <= self.lifetime // 2:
            new = _self_delegation(self.root, now, self.lifetime)
            self.holder.delegation = new
            self.renewals += 1
            self.log.info(
                "Roughtime: new online key {online} valid {mint} .. {maxt}",
                online=_b64(keys.public_bytes(new.online_key)),
                mint=iso(new.mint),
                maxt=iso(new.maxt),
            )

    def _check_file_delegation(self, now: int) -> None:
        d = self.delegation
        if d.mint <= now <= d.maxt - self.warn_ahead:
            return
        allowed, suppressed = self._warnings.allow()
        if not allowed:
            return
        if now > d.maxt:
            self.log.error(
                "Roughtime: the delegation in {path} expired at {maxt}: answering "
                "nobody until a new one is installed there and SIGHUP reloads it "
                "({suppressed} repeats suppressed)",
                path=self.path,
                maxt=iso(d.maxt),
                suppressed=suppressed,
            )
        elif now < d.mint:
            self.log.emit(
                LogLevel.warn,
                "Roughtime: the delegation in {path} is valid only from {mint}: "
                "answering nobody until then",
                path=self.path,
                mint=iso(d.mint),
            )
        else:
            self.log.emit(
                LogLevel.warn,
                "Roughtime: the delegation in {path} expires at {maxt}, in "
                "{hours:.0f} hours: make a new one (udptime roughtime delegate) and "
                "send SIGHUP",
                path=self.path,
                maxt=iso(d.maxt),
                hours=(d.maxt - now) / HOUR,
            )

    # -- SIGHUP ------------------------------------------------------------------

    def reload(self) -> str:
        """Re-read the delegation file (a SIGHUP reloader).

        Raises, keeping the delegation in force, for a file that cannot be
        read or trusted, that another root key signed (the server's identity
        changes only with a restart) or that has already expired.
        """
        if self.path is None:
            return "the delegation is made from the root key; nothing to reload"
        new = keys.load_delegation(Path(self.path))
        old = self.delegation
        if new.root_public_key != old.root_public_key:
            raise ValueError(
                f"{self.path} is signed by another root key "
                f"({_b64(new.root_public_key)}, not {_b64(old.root_public_key)}); "
                "restart to change the server's identity"
            )
        now = int(self.clock.seconds())
        if now > new.maxt:
            raise ValueError(f"{self.path} expired at {iso(new.maxt)}")
        if new.cert == old.cert:
            return f"unchanged, valid until {iso(new.maxt)}"
        self.holder.delegation = new
        self.reloads += 1
        self._warnings = LogThrottle(self.clock, limit=1, interval=WARN_INTERVAL)
        return (
            f"online key {_b64(keys.public_bytes(new.online_key))} "
            f"valid {iso(new.mint)} .. {iso(new.maxt)}"
        )


def _self_delegation(root: Ed25519PrivateKey, now: int, lifetime: int) -> Delegation:
    return keys.delegate(root, max(0, now - SELF_BACKDATE), now + lifetime)


class SummaryLines:
    """One line per Roughtime listener for the summary service (its ``also``):
    what the generic line cannot say (signatures, batch sizes, why requests
    were left unanswered), as differences since the last line."""

    log = Logger()

    def __init__(
        self, responders: Callable[[], Sequence[tuple[str, RoughtimeCounters]]]
    ) -> None:
        self._responders = responders
        self._last: dict[str, dict[str, int]] = {}

    def __call__(self, interval: float) -> None:
        for name, counters in self._responders():
            now = asdict(counters)
            before = self._last.get(name, dict.fromkeys(now, 0))
            delta = {key: now[key] - before[key] for key in now}
            self._last[name] = now
            batches = delta["batch_count"]
            self.log.info(
                "roughtime on {listener}: {answered} answered with {signatures} "
                "signatures (mean batch {mean_batch:.1f}); unanswered: {too_small} "
                "too small, {malformed} malformed, {unsupported_version} other "
                "versions, {wrong_server} for another key, {unsynchronised} "
                "unsynchronised clock, {expired} expired delegation, {not_yet_valid} "
                "delegation not yet valid in the last {interval} s",
                listener=name,
                mean_batch=delta["batch_leaves"] / batches if batches else 0.0,
                interval=interval,
                roughtime_summary=True,
                **delta,
            )
