"""The keys file's owner: loads, rotates and saves the NTS master keys on a
timer, and swaps each new :class:`~udptime.nts.keyset.KeySet` into the
:class:`~udptime.nts.keyset.KeyHolder` the datagram path reads.

Nothing here runs per datagram. The rules:

* At start-up (``startService``, which twistd calls after ``--uid``/
  ``--gid`` took effect) the file is read or created, rotated if due, and
  written back under the lock: that proves, as the user the server runs as,
  that it can be saved. If it cannot, one line on stderr and exit status 1,
  before anything is served.
* Every tick: reload the file if another process changed it, promote the
  next key when its time has come, and rotate when due, under an exclusive
  ``flock`` of ``FILE.lock`` and after reading the file again under it (the
  file is the truth: another process may have rotated first). A save is a
  temporary file written, fsynced and renamed over the keys file, mode 0600.
* A failed save changes nothing in memory: the holder keeps the last saved
  key set, whose current key goes on sealing past its period if it must, so
  no cookie is ever sealed under a key a restart or a peer could not open.
  Failures are counted in ``save_failures`` (a metric), logged at most once
  a minute with the number left out, and retried on the next tick.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterable, Iterator

from twisted.application import service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel

from udptime.logthrottle import LogThrottle
from udptime.nts.cookies import (
    DEFAULT_GRACE,
    DEFAULT_ROTATE,
    KeyFileError,
    MasterKey,
    Random,
    decode_keys_file,
    encode_keys_file,
)
from udptime.nts.keyset import KeyHolder, KeySet

#: Seconds between looks at the file (less for short rotation periods).
DEFAULT_INTERVAL = 1.0
#: At most one error (and one warning) line per this many seconds.
LOG_INTERVAL = 60.0

_Signature = tuple[int, int, int, int]


class LockBusy(KeyFileError):
    """Another process holds the lock (it is saving the file right now)."""


class KeyFileService(service.Service):
    """Owns the keys file at *path*; ``holder.key_set`` is what to seal and
    open with. *clock* gives wall-clock seconds (key creation times are
    compared across processes and restarts) and runs the timer."""

    log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime,
        *,
        rotate: float = DEFAULT_ROTATE,
        grace: int = DEFAULT_GRACE,
        random: Random = os.urandom,
        interval: float | None = None,
    ) -> None:
        self.path = path
        self.lock_path = f"{path}.lock"
        self.clock = clock
        self.rotate = float(rotate)
        self.grace = grace
        self._random = random
        self.interval = (
            min(DEFAULT_INTERVAL, self.rotate / 4) if interval is None else interval
        )
        self.holder = KeyHolder()
        #: Failed saves (and reads under the lock) since start: a metric.
        self.save_failures = 0
        #: Rotations this process saved, and reloads of a file changed by others.
        self.rotations = 0
        self.reloads = 0
        self._signature: _Signature | None = None
        self._loop: LoopingCall | None = None
        self._failing = 0
        self._busy = 0
        #: The file went missing (or empty) since we saved it.
        self._missing = False
        self._errors = LogThrottle(clock, limit=1, interval=LOG_INTERVAL)
        self._warnings = LogThrottle(clock, limit=1, interval=LOG_INTERVAL)

    # -- the service -------------------------------------------------------------

    def startService(self) -> None:
        try:
            self.load()
        except KeyFileError as exc:
            sys.stderr.write(f"udptime: NTS keys file {self.path}: {exc}\n")
            sys.stderr.flush()
            raise SystemExit(1) from None
        super().startService()  # type: ignore[no-untyped-call]
        loop = LoopingCall(self._tick_safely)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=False)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        super().stopService()  # type: ignore[no-untyped-call]

    def load(self) -> None:
        """Read (or create) the file, rotate if due, and save it: raises
        :class:`KeyFileError` unless all of that works."""
        now = self.clock.seconds()
        with self._locked(blocking=True):
            keys = self._read()
            if keys:
                key_set = KeySet.from_keys(keys, now, self.rotate, self.grace)
            else:
                key_set = KeySet.new(now, self._random, self.rotate, self.grace)
            key_set = key_set.rotated(now, self._random)
            self._write(key_set.keys)
        self.holder.key_set = key_set
        self.log.info(
            "NTS: cookie keys from {path}: current {current:08x}",
            path=self.path,
            current=key_set.current.key_id,
        )

    # -- the timer ---------------------------------------------------------------

    def _tick_safely(self) -> None:
        try:
            self.tick()
        except Exception:  # noqa: BLE001 - a bug must not stop the timer
            self.log.failure("NTS: keys file tick failed")

    def tick(self) -> None:
        """Reload, promote, rotate and save as due; swap in the result."""
        now = self.clock.seconds()
        key_set = self.holder.key_set
        if self._stat() != self._signature:
            try:
                keys = self._read()
            except KeyFileError as exc:
                self._warn(
                    "NTS: cannot reload keys file {path} ({error}); keeping the "
                    "keys in memory",
                    exc,
                )
            else:
                if keys:
                    key_set = KeySet.from_keys(keys, now, self.rotate, self.grace)
                    self.reloads += 1
                else:
                    self._missing = True
        key_set = key_set.at(now)
        if self._missing or key_set.rotation_due(now):
            try:
                key_set = self._rotate(now, key_set)
            except LockBusy as exc:
                # Someone is saving right now: look again next tick, and
                # complain only if that goes on.
                self._busy += 1
                if self._busy > 1:
                    self._save_failed(exc, key_set)
            except KeyFileError as exc:
                self._save_failed(exc, key_set)
            else:
                self._saved()
        if key_set is not self.holder.key_set:
            self.holder.key_set = key_set

    def _rotate(self, now: float, fallback: KeySet) -> KeySet:
        """Under the lock: the file's key set, rotated and saved if due; ours
        (*fallback*) saved if the file has gone."""
        with self._locked(blocking=False):
            keys = self._read()
            if keys:
                key_set = KeySet.from_keys(keys, now, self.rotate, self.grace)
            else:
                key_set = fallback
            due = key_set.rotation_due(now)
            if due:
                key_set = key_set.rotated(now, self._random)
            if due or not keys:
                self._write(key_set.keys)
            self._missing = False
        if due:
            self.rotations += 1
            assert key_set.next is not None
            self.log.info(
                "NTS: new cookie key {next:08x} saved to {path}; current {current:08x}",
                next=key_set.next.key_id,
                current=key_set.current.key_id,
                path=self.path,
            )
        return key_set

    def _save_failed(self, exc: KeyFileError, kept: KeySet) -> None:
        self.save_failures += 1
        self._failing += 1
        allowed, suppressed = self._errors.allow()
        if allowed:
            self.log.error(
                "NTS: cannot save keys file {path}: {error}; cookies stay sealed "
                "under saved key {current:08x}, retrying ({suppressed} similar "
                "errors suppressed)",
                path=self.path,
                error=exc,
                current=kept.current.key_id,
                suppressed=suppressed,
            )

    def _saved(self) -> None:
        self._busy = 0
        if self._failing:
            self.log.info(
                "NTS: keys file {path} saved again after {failures} failures",
                path=self.path,
                failures=self._failing,
            )
            self._failing = 0

    def _warn(self, text: str, exc: Exception) -> None:
        allowed, suppressed = self._warnings.allow()
        if allowed:
            self.log.emit(
                LogLevel.warn,
                text + " ({suppressed} similar warnings suppressed)",
                path=self.path,
                error=exc,
                suppressed=suppressed,
            )

    # -- the file ----------------------------------------------------------------

    def _stat(self) -> _Signature | None:
        try:
            return _signature(os.stat(self.path))
        except OSError:
            return None

    def _read(self) -> list[MasterKey] | None:
        """The keys in the file, ``None`` when it is missing."""
        try:
            with open(self.path, "rb") as f:
                signature = _signature(os.fstat(f.fileno()))
                raw = f.read()
        except FileNotFoundError:
            self._signature = None
            return None
        except OSError as exc:
            raise KeyFileError(f"cannot read it: {exc.strerror}") from None
        # Remembered even if malformed: warn once per change, not per tick.
        self._signature = signature
        return decode_keys_file(raw)

    def _write(self, keys: Iterable[MasterKey]) -> None:
        data = encode_keys_file(keys)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        step = f"remove a stale {tmp}"
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            step = f"create {tmp}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                step = f"write {tmp}"
                os.fchmod(fd, 0o600)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            step = f"rename {tmp} to it"
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KeyFileError(f"cannot {step}: {exc.strerror}") from None
        with contextlib.suppress(OSError):
            directory = os.open(os.path.dirname(os.path.abspath(self.path)), 0)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        self._signature = self._stat()

    @contextlib.contextmanager
    def _locked(self, *, blocking: bool) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyFileError(
                f"cannot open lock file {self.lock_path}: {exc.strerror}"
            ) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                raise LockBusy(f"lock file {self.lock_path} is held") from None
            except OSError as exc:
                raise KeyFileError(
                    f"cannot lock {self.lock_path}: {exc.strerror}"
                ) from None
            yield
        finally:
            os.close(fd)


def _signature(st: os.stat_result) -> _Signature:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
