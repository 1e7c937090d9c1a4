"""Which master keys seal and open NTS cookies, and when they rotate. Pure.

A :class:`KeySet` is immutable and holds only keys that are in the keys
file: the shell (:mod:`udptime.nts.keyfile`) builds a new one from what it
read or saved and swaps it into a :class:`KeyHolder`; the datagram path
reads ``holder.key_set`` (through ``holder.seal`` and ``holder.open``) and
never touches the file.

The schedule follows from the keys' creation times and the clock alone, so
every process sharing the file agrees on it without talking:

* the *current* key, the newest created at or before now, seals;
* the *next* key, created after now, is already in the file a good while
  before it becomes current, so every process has loaded it by the time a
  peer seals with it;
* a key no longer current (*previous*) opens cookies for *grace* more
  periods, counted from its successor's creation, and is then dropped.

A rotation is due when there is no next key. It adds one, created a period
after the current key; if the current key is already past its period (a save
failed, or the server was down), half a period from now instead, so that
peers still have time to load it and the previous key's grace counts from
when it really stopped sealing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    DEFAULT_GRACE,
    DEFAULT_ROTATE,
    KEY_ID_LENGTH,
    MASTER_KEY_LENGTH,
    CookieKeys,
    MasterKey,
    Random,
    cookie_key_id,
)


@dataclass(frozen=True)
class KeySet:
    """The master keys at one moment: *current* seals; it, *next* and
    *previous* (newest first) open. *rotate* is the period in seconds,
    *grace* how many periods a retired key still opens cookies.

    *accepted* keys only open: those a second fleet secret derives while it
    is brought in or retired (:mod:`udptime.nts.derivedkeys`). They are in
    no keys file and take no part in the schedule.
    """

    current: MasterKey
    next: MasterKey | None = None
    previous: tuple[MasterKey, ...] = ()
    rotate: float = DEFAULT_ROTATE
    grace: int = DEFAULT_GRACE
    accepted: tuple[MasterKey, ...] = ()
    _opens: Mapping[int, MasterKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.rotate < math.inf:
            raise ValueError(f"rotation period must be > 0 seconds, not {self.rotate}")
        if self.grace < 0:
            raise ValueError(f"grace must be >= 0 periods, not {self.grace}")
        every = [*self.keys, *self.accepted]
        opens = {key.key_id: key for key in every}
        if len(opens) != len(every):
            raise ValueError("two keys share an id")
        object.__setattr__(self, "_opens", opens)

    # -- the datagram path ---------------------------------------------------

    def seal(self, keys: CookieKeys, nonce: bytes) -> bytes:
        """A cookie carrying *keys*, sealed under the current key."""
        return self.current.seal(keys, nonce)

    def open(self, cookie: bytes) -> CookieKeys | None:
        """The keys in *cookie*, or ``None``: unknown key, expired, forged."""
        key_id = cookie_key_id(cookie)
        key = self._opens.get(key_id) if key_id is not None else None
        return key.open(cookie) if key is not None else None

    # -- the schedule ----------------------------------------------------------

    @property
    def keys(self) -> list[MasterKey]:
        """Every key in the set, oldest first: what the keys file holds."""
        keys = [*reversed(self.previous), self.current]
        if self.next is not None:
            keys.append(self.next)
        return keys

    @classmethod
    def from_keys(
        cls,
        keys: Iterable[MasterKey],
        now: float,
        rotate: float = DEFAULT_ROTATE,
        grace: int = DEFAULT_GRACE,
    ) -> KeySet:
        """The key set at *now* from the keys in a file (any order).

        Expired keys are left out, and so are keys beyond the next one. If
        every key was created after *now* (the clock went back), the oldest
        is current. ``ValueError`` for no keys at all.
        """
        ordered = sorted(keys, key=_created)
        if not ordered:
            raise ValueError("a key set needs at least one key")
        index = 0
        for i, key in enumerate(ordered):
            if key.created <= now:
                index = i
        # Created after now: index is the last key created at or before it.
        following = ordered[index + 1] if index + 1 < len(ordered) else None
        previous = tuple(
            key
            for key, successor in zip(
                reversed(ordered[:index]), reversed(ordered[1 : index + 1])
            )
            if now < successor.created + grace * rotate
        )
        return cls(ordered[index], following, previous, rotate, grace)

    @classmethod
    def new(
        cls,
        now: float,
        random: Random,
        rotate: float = DEFAULT_ROTATE,
        grace: int = DEFAULT_GRACE,
    ) -> KeySet:
        """A first key set: a current key created *now*, and the next one."""
        current = _new_key(now, random, set())
        return cls(current, rotate=rotate, grace=grace).rotated(now, random)

    def at(self, now: float) -> KeySet:
        """This set at *now*: the next key promoted when its time has come,
        expired keys dropped; ``self`` when nothing changes."""
        moved = KeySet.from_keys(self.keys, now, self.rotate, self.grace)
        if self.accepted:
            moved = replace(moved, accepted=self.accepted)
        return self if moved == self else moved

    def rotation_due(self, now: float) -> bool:
        """Whether a rotation is due at *now*: no next key is waiting."""
        return self.at(now).next is None

    def rotated(self, now: float, random: Random) -> KeySet:
        """The set after a rotation at *now* (just :meth:`at` if none is due)."""
        base = self.at(now)
        if base.next is not None:
            return base
        current = base.current
        created = max(current.created + base.rotate, now + base.rotate / 2)
        following = _new_key(created, random, set(base._opens))
        return replace(base, next=following)


class KeyHolder:
    """The one mutable cell between the keys file's owner and the datagram
    path: the owner replaces ``key_set`` whole; readers take it with one
    attribute access. Unset until the keys are loaded.

    It is also the responder's cookie jar (``seal``, ``open``): each call
    uses the key set current at that moment, and fresh *random* nonces.
    """

    __slots__ = ("_random", "key_set")

    key_set: KeySet

    def __init__(self, key_set: KeySet | None = None, random: Random = os.urandom):
        self._random = random
        if key_set is not None:
            self.key_set = key_set

    def seal(self, keys: CookieKeys) -> bytes:
        return self.key_set.current.seal(keys, self._random(COOKIE_NONCE_LENGTH))

    def open(self, cookie: bytes) -> CookieKeys | None:
        return self.key_set.open(cookie)


def _created(key: MasterKey) -> float:
    return key.created


def _new_key(created: float, random: Random, taken: set[int]) -> MasterKey:
    while True:
        key_id = int.from_bytes(random(KEY_ID_LENGTH), "big")
        if key_id not in taken:
            return MasterKey(key_id, random(MASTER_KEY_LENGTH), created)
