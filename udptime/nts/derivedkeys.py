"""NTS master keys derived from a fleet secret: every host, the same keys. Pure.

Hosts that hold the same secret compute the same master key for each
rotation period, so a cookie sealed on one opens on every other with no
traffic between them and no shared disk::

    period  = floor(now / rotate)
    key id || key = HKDF-SHA256(secret, salt = SALT,
                                info = INFO || period (u64) || rotate (f64),
                                length = 4 + 64)

The key of period *n* counts as created at ``n * rotate``. The set at *now*
is what :class:`~udptime.nts.keyset.KeySet` means by it: period *n* seals,
*n + 1* already opens (a host whose clock is a little ahead seals with it),
and *n - 1* ... *n - grace* still open.

Rollover: keys derived from further (*accepted*) secrets open cookies but
never seal, so a new secret can be accepted everywhere before any host
seals with it, and an old one while the last cookies sealed under it age
out. The trade-off: whoever holds a secret can open every cookie sealed
under it, in every period, past and future; a keys file's random keys are
gone once rotated out.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from udptime.nts.cookies import (
    DEFAULT_GRACE,
    DEFAULT_ROTATE,
    KEY_ID_LENGTH,
    MASTER_KEY_LENGTH,
    MasterKey,
)
from udptime.nts.keyset import KeySet

#: Fewest bytes of secret accepted (256 bits).
MIN_SECRET_LENGTH = 32
SALT = b"udptime NTS fleet secret v1"
INFO = b"udptime NTS master key"
_PERIOD = struct.Struct("!Qd")


class SecretError(ValueError):
    """Text that is not a fleet secret."""


def parse_secret(text: bytes) -> bytes:
    """A secret file's content: hexadecimal, at least 32 bytes, surrounding
    white space ignored (``openssl rand -hex 32`` writes one)."""
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SecretError("expected hexadecimal digits") from None
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretError(
            f"expected at least {MIN_SECRET_LENGTH} bytes "
            f"({2 * MIN_SECRET_LENGTH} hex digits), not {len(secret)}"
        )
    return secret


def period_of(now: float, rotate: float) -> int:
    """The rotation period *now* falls in."""
    return math.floor(now / rotate)


def derive_key(secret: bytes, period: int, rotate: float) -> MasterKey:
    """The master key *secret* gives for *period* of *rotate* seconds."""
    if period < 0:
        raise ValueError(f"no key before 1970: period {period}")
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_ID_LENGTH + MASTER_KEY_LENGTH,
        salt=SALT,
        info=INFO + _PERIOD.pack(period, rotate),
    ).derive(secret)
    return MasterKey(
        int.from_bytes(material[:KEY_ID_LENGTH], "big"),
        material[KEY_ID_LENGTH:],
        period * rotate,
    )


def fingerprint(secret: bytes) -> str:
    """Eight hex digits that name *secret* in logs without giving it away:
    hosts that print different ones do not share a secret."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(SALT + b" fingerprint" + secret)
    return digest.finalize()[:4].hex()


def derived_key_set(
    secret: bytes,
    now: float,
    *,
    rotate: float = DEFAULT_ROTATE,
    grace: int = DEFAULT_GRACE,
    accepted: Sequence[bytes] = (),
) -> KeySet:
    """The key set at *now*: *secret* seals and opens, *accepted* only open.

    Two keys with one id (a 32-bit collision) cannot both open: the one
    listed first keeps it (current, next, previous newest first, then the
    accepted secrets' in the same order), on every host alike.
    """
    period = period_of(now, rotate)
    periods = [period, period + 1, *range(period - 1, period - grace - 1, -1)]
    taken: set[int] = set()

    def unique(keys: Iterable[MasterKey]) -> list[MasterKey | None]:
        kept: list[MasterKey | None] = []
        for key in keys:
            kept.append(None if key.key_id in taken else key)
            taken.add(key.key_id)
        return kept

    current, following, *previous = unique(
        derive_key(secret, n, rotate) for n in periods if n >= 0
    )
    assert current is not None
    others = unique(
        derive_key(other, n, rotate) for other in accepted for n in periods if n >= 0
    )
    return KeySet(
        current,
        following,
        tuple(key for key in previous if key is not None),
        rotate,
        grace,
        tuple(key for key in others if key is not None),
    )


def next_change(now: float, rotate: float) -> float:
    """When the set derived at *now* stops being current: the next period."""
    return (period_of(now, rotate) + 1) * rotate
