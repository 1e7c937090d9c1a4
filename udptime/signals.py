"""Signals an operator's tools send: SIGHUP reloads, SIGUSR1/SIGUSR2 are harmless.

Service managers send SIGHUP for "reload" and log rotators send SIGHUP or
SIGUSR1; by default each would kill the process without a shutdown line.
SIGHUP runs every registered reloader (what can change without a restart:
access lists from files, the NTS certificate, the Roughtime delegation) and
logs one line each; a reloader that fails keeps what it had and says why,
so a bad reload never stops serving. SIGUSR1/SIGUSR2 are logged and
ignored, unless twistd already uses SIGUSR1 (log file rotation).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application import service
from twisted.logger import Logger

#: A reloader re-reads what it owns and says, in a few words, what changed.
Reloader = Callable[[], str]

_Handler = Callable[[int, FrameType | None], Any] | int | None


class SignalService(service.Service):
    """Installs the handlers while running; the reactor does the work.

    *also* are called on SIGHUP after the reloaders (the worker supervisor
    passes the signal on to its workers).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        reloaders: dict[str, Reloader] | None = None,
        also: list[Callable[[int], None]] | None = None,
    ) -> None:
        self._reactor = reactor
        self.reloaders: dict[str, Reloader] = dict(reloaders or {})
        self.also = list(also or [])
        self._previous: dict[int, _Handler] = {}
        #: SIGHUPs handled, for tests and summaries
        self.reloads = 0

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._install(signal.SIGHUP, always=True)
        self._install(signal.SIGUSR1, always=False)
        self._install(signal.SIGUSR2, always=False)

    def stopService(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()
        super().stopService()  # type: ignore[no-untyped-call]

    def _install(self, number: int, *, always: bool) -> None:
        current = signal.getsignal(number)
        if not always and current not in (signal.SIG_DFL, None):
            return  # somebody (twistd's log rotation) uses it already
        self._previous[number] = current
        signal.signal(number, self._received)

    def _received(self, number: int, frame: FrameType | None) -> None:
        # Called between bytecodes of whatever runs: hand over to the reactor.
        self._reactor.callFromThread(self.handle, number)

    def handle(self, number: int) -> None:
        """What a signal does, outside the signal handler."""
        if number == signal.SIGHUP:
            self.reload()
            for call in self.also:
                call(number)
        else:
            self.log.info(
                "{signal} received: ignored (SIGHUP reloads)",
                signal=signal.Signals(number).name,
            )

    def reload(self) -> None:
        self.reloads += 1
        if not self.reloaders:
            self.log.info("SIGHUP: nothing to reload")
        for name, reloader in self.reloaders.items():
            try:
                outcome = reloader()
            except Exception as exc:  # noqa: BLE001 - a bad reload keeps serving
                self.log.error(
                    "SIGHUP: {what} not reloaded, keeping the old: {error}",
                    what=name,
                    error=exc,
                )
            else:
                self.log.info("SIGHUP: {what}: {outcome}", what=name, outcome=outcome)
