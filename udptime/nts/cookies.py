"""Stateless NTS cookies and the master keys that seal them.

A cookie carries the keys one NTS-KE session established, sealed so that only
this server (and servers sharing its keys file) can open it: the server keeps
no per-client state at all. Layout (104 bytes, a multiple of 4 as NTP
extension fields and chrony require)::

    key id (4) || nonce (16) || AES-SIV(master key, AD = key id, nonce,
                                        AEAD id (2) || zero (2) || C2S || S2C)

Master keys are AES-SIV-CMAC-512 keys (64 bytes). This module is pure:
the cookie layout, one master key's seal and open, and the keys file's JSON
(encode and decode). Which keys seal and open when is
:mod:`udptime.nts.keyset`; reading, rotating and saving the file on a timer
is :mod:`udptime.nts.keyfile`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

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
    _id: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.key_id <= 0xFFFF_FFFF:
            raise ValueError(f"key id must fit 32 bits, not {self.key_id}")
        if len(self.key) != MASTER_KEY_LENGTH:
            raise ValueError(f"master key must be {MASTER_KEY_LENGTH} bytes")
        object.__setattr__(self, "_siv", AESSIV(self.key))
        object.__setattr__(self, "_id", _KEY_ID.pack(self.key_id))

    def seal(self, keys: CookieKeys, nonce: bytes) -> bytes:
        if len(nonce) != COOKIE_NONCE_LENGTH:
            raise ValueError(f"cookie nonce must be {COOKIE_NONCE_LENGTH} bytes")
        return self.seal_plaintext(keys.plaintext(), nonce)

    def open(self, cookie: bytes) -> CookieKeys | None:
        """The keys in *cookie*, or ``None`` if this key did not seal it."""
        plaintext = self.open_plaintext(cookie)
        return None if plaintext is None else CookieKeys.from_plaintext(plaintext)

    # The datagram path works on the plaintext (``CookieKeys.plaintext``):
    # it keys the responder's cipher cache, so a known client costs no
    # object and no check beyond the AEAD's own.

    def seal_plaintext(self, plaintext: bytes, nonce: bytes) -> bytes:
        """A cookie carrying *plaintext*; *nonce* must be 16 fresh random bytes."""
        key_id = self._id
        return key_id + nonce + self._siv.encrypt(plaintext, [key_id, nonce])

    def open_plaintext(self, cookie: bytes) -> bytes | None:
        """The plaintext of *cookie*, or ``None`` if this key did not seal it."""
        head = KEY_ID_LENGTH + COOKIE_NONCE_LENGTH
        if len(cookie) < head + SIV_TAG_LENGTH or cookie[:KEY_ID_LENGTH] != self._id:
            return None
        try:
            return self._siv.decrypt(
                cookie[head:], [self._id, cookie[KEY_ID_LENGTH:head]]
            )
        except InvalidTag:
            return None

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
        except (ValueError, OverflowError) as exc:
            raise KeyFileError(f"bad key entry: {exc}") from None


def cookie_key_id(cookie: bytes) -> int | None:
    if len(cookie) < KEY_ID_LENGTH:
        return None
    return int(_KEY_ID.unpack_from(cookie)[0])


def encode_keys_file(keys: Iterable[MasterKey]) -> bytes:
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
