"""Stateless NTS cookies and the master keys that seal them.

A cookie carries the keys one NTS-KE session established, sealed so that only
this server (and servers sharing its keys file) can open it: the server keeps
no per-client state at all. Layout (104 bytes, a multiple of 4 as NTP
extension fields and chrony require)::

    key id (4) || nonce (16) || AES-SIV(master key, AD = key id, nonce,
                                        AEAD id (2) || zero (2) || C2S || S2C)

Master keys are AES-SIV-CMAC-512 keys (64 bytes). One is current and seals
new cookies; each key is current for *rotate* seconds and then still opens
cookies for *grace* more rotation periods. :class:`KeyStore` keeps them in a
JSON file with 0600 permissions, so that a restart or another process
serving the same keys file opens the cookies this one made. Whoever finds the
current key expired rotates it under an exclusive ``flock`` of
``FILE.lock``; every process notices a changed file within
``check_interval`` seconds and reloads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from twisted.logger import Logger, LogLevel

from udptime.nts.records import AEAD_AES_SIV_CMAC_256

#: Key length (each of C2S and S2C) of the AEAD algorithms this server offers.
AEAD_KEY_LENGTHS = {AEAD_AES_SIV_CMAC_256: 32}

MASTER_KEY_LENGTH = 64
KEY_ID_LENGTH = 4
COOKIE_NONCE_LENGTH = 16
SIV_TAG_LENGTH = 16
_PLAINTEXT_HEAD = struct.Struct("!HH")
_KEY_ID = struct.Struct("!I")

DEFAULT_ROTATE = 86_400.0
DEFAULT_GRACE = 2
DEFAULT_CHECK_INTERVAL = 1.0
#: An unknown key id makes the store look at the file again, this often at most.
_UNKNOWN_KEY_RECHECK = 0.1

FILE_FORMAT = "udptime-nts-keys"
FILE_VERSION = 1

Random = Callable[[int], bytes]


class KeyFileError(Exception):
    """The keys file cannot be read, parsed or written."""


@dataclass(frozen=True, slots=True)
class CookieKeys:
    """What one NTS-KE session agreed, and what a cookie carries back."""

    aead: int
    c2s: bytes
    s2c: bytes

    def __post_init__(self) -> None:
        length = AEAD_KEY_LENGTHS.get(self.aead)
        if length is None:
            raise ValueError(f"unsupported AEAD algorithm {self.aead}")
        if len(self.c2s) != length or len(self.s2c) != length:
            raise ValueError(f"AEAD {self.aead} keys must be {length} bytes")

    def plaintext(self) -> bytes:
        return _PLAINTEXT_HEAD.pack(self.aead, 0) + self.c2s + self.s2c

    @classmethod
    def from_plaintext(cls, plaintext: bytes) -> CookieKeys | None:
        if len(plaintext) < _PLAINTEXT_HEAD.size:
            return None
        aead, reserved = _PLAINTEXT_HEAD.unpack_from(plaintext)
        length = AEAD_KEY_LENGTHS.get(aead)
        if reserved or length is None or len(plaintext) != 4 + 2 * length:
            return None
        return cls(aead, plaintext[4 : 4 + length], plaintext[4 + length :])


def cookie_length(aead: int = AEAD_AES_SIV_CMAC_256) -> int:
    """Bytes of a cookie carrying keys for *aead*."""
    plaintext = _PLAINTEXT_HEAD.size + 2 * AEAD_KEY_LENGTHS[aead]
    return KEY_ID_LENGTH + COOKIE_NONCE_LENGTH + SIV_TAG_LENGTH + plaintext


@dataclass(frozen=True)
class MasterKey:
    """A cookie-sealing key: id, 64 key bytes, creation time (POSIX seconds)."""

    key_id: int
    key: bytes
    created: float
    _siv: AESSIV = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 0xFFFF_FFFF:
            raise ValueError(f"key id must fit 32 bits, not {self.key_id}")
        if len(self.key) != MASTER_KEY_LENGTH:
            raise ValueError(f"master key must be {MASTER_KEY_LENGTH} bytes")
        object.__setattr__(self, "_siv", AESSIV(self.key))

    def seal(self, keys: CookieKeys, nonce: bytes) -> bytes:
        if len(nonce) != COOKIE_NONCE_LENGTH:
            raise ValueError(f"cookie nonce must be {COOKIE_NONCE_LENGTH} bytes")
        key_id = _KEY_ID.pack(self.key_id)
        return key_id + nonce + self._siv.encrypt(keys.plaintext(), [key_id, nonce])

    def open(self, cookie: bytes) -> CookieKeys | None:
        """The keys in *cookie*, or ``None`` if this key did not seal it."""
        head = KEY_ID_LENGTH + COOKIE_NONCE_LENGTH
        if len(cookie) < head + SIV_TAG_LENGTH:
            return None
        key_id = cookie[:KEY_ID_LENGTH]
        if _KEY_ID.unpack(key_id)[0] != self.key_id:
            return None
        nonce = cookie[KEY_ID_LENGTH:head]
        try:
            plaintext = self._siv.decrypt(cookie[head:], [key_id, nonce])
        except InvalidTag:
            return None
        return CookieKeys.from_plaintext(plaintext)

    def to_json(self) -> dict[str, object]:
        return {"id": self.key_id, "created": self.created, "key": self.key.hex()}

    @classmethod
    def from_json(cls, item: object) -> MasterKey:
        if not isinstance(item, dict):
            raise KeyFileError(f"a key entry must be an object, not {item!r}")
        try:
            key_id, created, key = item["id"], item["created"], item["key"]
        except KeyError as exc:
            raise KeyFileError(f"a key entry lacks {exc.args[0]!r}") from None
        if not isinstance(key_id, int) or not isinstance(created, int | float):
            raise KeyFileError("key id must be an integer and created a number")
        if not isinstance(key, str):
            raise KeyFileError("key must be hexadecimal text")
        try:
            return cls(key_id, bytes.fromhex(key), float(created))
        except ValueError as exc:
            raise KeyFileError(f"bad key entry: {exc}") from None


def cookie_key_id(cookie: bytes) -> int | None:
    if len(cookie) < KEY_ID_LENGTH:
        return None
    return int(_KEY_ID.unpack_from(cookie)[0])


def encode_keys_file(keys: list[MasterKey]) -> bytes:
    document = {
        "format": FILE_FORMAT,
        "version": FILE_VERSION,
        "keys": [key.to_json() for key in keys],
    }
    return (json.dumps(document, indent=1) + "\n").encode("ascii")


def decode_keys_file(raw: bytes) -> list[MasterKey]:
    """The keys in a keys file, oldest first; :class:`KeyFileError` if malformed."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"not JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise KeyFileError(f"not a {FILE_FORMAT} file")
    if document.get("version") != FILE_VERSION:
        raise KeyFileError(f"unsupported version {document.get('version')!r}")
    items = document.get("keys")
    if not isinstance(items, list):
        raise KeyFileError("'keys' must be a list")
    keys = sorted((MasterKey.from_json(item) for item in items), key=_created)
    if len({key.key_id for key in keys}) != len(keys):
        raise KeyFileError("two keys share an id")
    return keys


def _created(key: MasterKey) -> float:
    return key.created


_Signature = tuple[int, int, int, int]


class KeyStore:
    """The master keys: the current one seals, the recent ones open.

    *path* ``None`` keeps the keys in memory only (tests, or a server that
    wants every restart to invalidate its cookies). *clock* returns POSIX
    seconds; it must be the wall clock when the file is shared, since
    creation times are compared across processes and restarts.
    """

    log = Logger()

    def __init__(
        self,
        path: str | None,
        clock: Callable[[], float],
        *,
        rotate: float = DEFAULT_ROTATE,
        grace: int = DEFAULT_GRACE,
        random: Random = os.urandom,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
    ) -> None:
        if not rotate > 0:
            raise ValueError(f"rotation interval must be > 0 seconds, not {rotate}")
        if grace < 0:
            raise ValueError(f"grace must be >= 0 rotations, not {grace}")
        self.path = path
        self._clock = clock
        self.rotate = float(rotate)
        self.grace = grace
        self._random = random
        self._check_interval = check_interval
        self._keys: dict[int, MasterKey] = {}
        self._current: MasterKey | None = None
        self._signature: _Signature | None = None
        self._next_check = -float("inf")
        self._checked = -float("inf")
        self._last_unknown = -float("inf")
        #: Rotations this process made, and reloads of a changed file.
        self.rotations = 0
        self.reloads = 0

    # -- queries ---------------------------------------------------------

    @property
    def keys(self) -> list[MasterKey]:
        """The keys that open cookies now, oldest first."""
        return sorted(self._keys.values(), key=_created)

    def current(self) -> MasterKey:
        """The key new cookies are sealed with; rotates or reloads when due."""
        self.tick()
        assert self._current is not None
        return self._current

    def seal(self, keys: CookieKeys) -> bytes:
        return self.current().seal(keys, self._random(COOKIE_NONCE_LENGTH))

    def open(self, cookie: bytes) -> CookieKeys | None:
        """The keys sealed in *cookie*, or ``None`` (unknown key, forged, expired)."""
        self.tick()
        key_id = cookie_key_id(cookie)
        if key_id is None:
            return None
        key = self._keys.get(key_id)
        if key is None:
            # Another process may have rotated a moment ago.
            now = self._clock()
            if now - self._last_unknown < _UNKNOWN_KEY_RECHECK or self.path is None:
                return None
            self._last_unknown = now
            self._refresh(now, force=True)
            key = self._keys.get(key_id)
            if key is None:
                return None
        return key.open(cookie)

    # -- time ------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Rotate, expire and reload as due; one float compare when nothing is."""
        if now is None:
            now = self._clock()
        if now >= self._next_check or now < self._checked:
            self._refresh(now)

    def _expires(self, key: MasterKey) -> float:
        return key.created + self.rotate * (1 + self.grace)

    def _stale(self, key: MasterKey | None, now: float) -> bool:
        """Whether *key* must no longer seal: its period is over (or far ahead)."""
        if key is None:
            return True
        return not key.created - self.rotate <= now < key.created + self.rotate

    def _refresh(self, now: float, force: bool = False) -> None:
        self._checked = now
        if self.path is not None and (force or self._file_changed()):
            self._reload()
        if self._stale(self._current, now):
            self._rotate(now)
        self._expire(now)
        assert self._current is not None
        self._next_check = min(
            now + self._check_interval, self._current.created + self.rotate
        )

    def _expire(self, now: float) -> None:
        for key_id, key in list(self._keys.items()):
            if key is not self._current and now >= self._expires(key):
                del self._keys[key_id]

    def _adopt(self, keys: list[MasterKey]) -> None:
        self._keys = {key.key_id: key for key in keys}
        self._current = keys[-1] if keys else None

    def _rotate(self, now: float, strict: bool = False) -> None:
        if self.path is None:
            self._add_key(now)
            self.rotations += 1
            return
        try:
            with self._locked():
                # Under the lock the file is the truth: another process may
                # have rotated since we last looked.
                self._reload(strict=strict)
                if not self._stale(self._current, now):
                    return
                self._add_key(now)
                self._expire(now)
                self._save()
        except KeyFileError as exc:
            if strict:
                raise
            if self._stale(self._current, now):
                self._add_key(now)
            self.log.error(
                "NTS: {error}; using an unsaved cookie key (other processes and "
                "restarts will not open its cookies)",
                error=exc,
            )
            self.rotations += 1
            return
        self.rotations += 1
        self.log.info(
            "NTS: new cookie key {key_id:08x} in {path}",
            key_id=self._keys_current_id(),
            path=self.path,
        )

    def _keys_current_id(self) -> int:
        assert self._current is not None
        return self._current.key_id

    def _add_key(self, now: float) -> None:
        while True:
            key_id = int.from_bytes(self._random(KEY_ID_LENGTH), "big")
            if key_id not in self._keys:
                break
        key = MasterKey(key_id, self._random(MASTER_KEY_LENGTH), now)
        self._keys[key_id] = key
        self._current = key

    # -- the file ----------------------------------------------------------

    def load(self) -> None:
        """Read the keys file, creating it (and a first key) when missing.

        Raises :class:`KeyFileError` for a file that exists but is unusable,
        so a typo in a path stops the server instead of silently starting
        over with new keys.
        """
        now = self._clock()
        if self.path is not None:
            self._reload(strict=True)
        if self._stale(self._current, now):
            self._rotate(now, strict=True)
        self._refresh(now)

    def _file_changed(self) -> bool:
        return self._stat() != self._signature

    def _stat(self) -> _Signature | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self, strict: bool = False) -> None:
        assert self.path is not None
        signature = self._stat()
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
            keys = decode_keys_file(raw)
        except FileNotFoundError:
            self._signature = None
            return
        except (OSError, KeyFileError) as exc:
            if strict:
                raise KeyFileError(f"{self.path}: {exc}") from None
            self.log.emit(
                LogLevel.warn,
                "NTS: cannot reload {path} ({error}); keeping the keys in memory",
                path=self.path,
                error=exc,
            )
            self._signature = signature
            return
        if signature is not None and stat.S_IMODE(os.stat(self.path).st_mode) & 0o077:
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)
        self._signature = signature
        if self._current is not None:
            self.reloads += 1
        if keys or self._current is None:
            self._adopt(keys)

    def _save(self) -> None:
        assert self.path is not None
        data = encode_keys_file(self.keys)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KeyFileError(f"cannot write {self.path}: {exc}") from None
        self._signature = self._stat()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        assert self.path is not None
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyFileError(f"cannot lock {self.path}: {exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                raise KeyFileError(f"cannot lock {self.path}: {exc}") from None
            yield
        finally:
            os.close(fd)
