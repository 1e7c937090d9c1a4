"""The fleet secret's owner: reads the secret files, derives each period's
:class:`~udptime.nts.keyset.KeySet` and swaps it into the
:class:`~udptime.nts.keyset.KeyHolder` on time. Writes no file.

The derivation is :mod:`udptime.nts.derivedkeys`; this is its shell:

* At start-up (``startService``, after twistd's ``--uid``/``--gid``, as
  every ``--workers`` process does for itself) each file is read and
  checked: readable, no access for group or others, a valid secret. If not,
  one line on stderr and exit status 1, before anything is served.
* A timer fires at each period boundary (and at least every
  :data:`MAX_WAIT` seconds, so a stepped clock is caught up with) and swaps
  in the set derived from the clock at that moment.
* :meth:`reload` (SIGHUP) reads the files again: a bad one keeps the
  secrets in memory, and says why.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Sequence

from twisted.application import service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from udptime.nts.cookies import DEFAULT_GRACE, DEFAULT_ROTATE
from udptime.nts.derivedkeys import (
    SecretError,
    derived_key_set,
    fingerprint,
    next_change,
    parse_secret,
)
from udptime.nts.keyset import KeyHolder

#: Longest wait between looks at the clock.
MAX_WAIT = 60.0


def read_secret(path: str) -> bytes:
    """The secret in *path*; :class:`SecretError` says what is wrong with it."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read()
    except OSError as exc:
        raise SecretError(f"cannot read it: {exc.strerror}") from None
    if mode & 0o077:
        raise SecretError(
            f"mode {stat.S_IMODE(mode):04o} lets others read it: chmod 0600"
        )
    return parse_secret(raw)


class KeySecretService(service.Service):
    """Derives the NTS master keys from the secret in *path* (and opens
    cookies under those in *accepted*); ``holder.key_set`` is the result.
    *clock* gives wall-clock seconds, which every host must agree on to
    within a small part of *rotate*, and runs the timer."""

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        *,
        accepted: Sequence[str] = (),
        rotate: float = DEFAULT_ROTATE,
        grace: int = DEFAULT_GRACE,
    ) -> None:
        self.path = path
        self.accepted_paths = tuple(accepted)
        self.clock = clock
        self.rotate = float(rotate)
        self.grace = grace
        self.holder = KeyHolder()
        self._secret = b""
        self._accepted: tuple[bytes, ...] = ()
        self._timer: IDelayedCall | None = None

    # -- the service ---------------------------------------------------------

    def startService(self) -> None:
        try:
            self._secret, self._accepted = self._read()
        except SecretError as exc:
            sys.stderr.write(f"udptime: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        self._swap()
        self.log.info(
            "NTS: cookie keys derived from fleet secret {path} ({fingerprint}); "
            "{accepted}",
            path=self.path,
            fingerprint=fingerprint(self._secret),
            accepted=self._accepted_text(),
        )
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        super().stopService()  # type: ignore[no-untyped-call]

    def reload(self) -> str:
        """Read the secret files again (SIGHUP); one line saying what happened."""
        try:
            secret, accepted = self._read()
        except SecretError as exc:
            return f"NTS key secrets kept: {exc}"
        self._secret, self._accepted = secret, accepted
        self._swap()
        return f"NTS key secret {fingerprint(secret)} seals; {self._accepted_text()}"

    # -- the work --------------------------------------------------------------

    def _read(self) -> tuple[bytes, tuple[bytes, ...]]:
        secrets = []
        for option, path in [
            ("--nts-key-secret", self.path),
            *(("--nts-key-secret-accept", p) for p in self.accepted_paths),
        ]:
            try:
                secrets.append(read_secret(path))
            except SecretError as exc:
                raise SecretError(f"{option} {path}: {exc}") from None
        return secrets[0], tuple(secrets[1:])

    def _accepted_text(self) -> str:
        if not self._accepted:
            return "no other secret accepted"
        names = ", ".join(fingerprint(s) for s in self._accepted)
        return f"also opening cookies under {names}"

    def _swap(self) -> None:
        """Derive the set for now, and come back when it changes."""
        now = self.clock.seconds()
        key_set = derived_key_set(
            self._secret,
            now,
            rotate=self.rotate,
            grace=self.grace,
            accepted=self._accepted,
        )
        held = getattr(self.holder, "key_set", None)
        if held != key_set:
            self.holder.key_set = key_set
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        wait = min(next_change(now, self.rotate) - now, MAX_WAIT)
        self._timer = self.clock.callLater(max(wait, 0.0), self._swap)
