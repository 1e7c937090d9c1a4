"""The pure key set: which key seals, which open, and the rotation schedule."""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    MasterKey,
    cookie_key_id,
)
from udptime.nts.keyset import KeyHolder, KeySet

DAY = 86_400.0
START = 1_700_000_000.0
KEYS = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))


def key(key_id: int, created: float) -> MasterKey:
    return MasterKey(key_id, key_id.to_bytes(4, "big") * 16, created)


def seal(key_set: KeySet) -> bytes:
    return key_set.seal(KEYS, os.urandom(COOKIE_NONCE_LENGTH))


class ScheduleTests(unittest.TestCase):
    def test_new(self) -> None:
        ks = KeySet.new(START, os.urandom, DAY, 2)
        self.assertEqual(ks.current.created, START)
        assert ks.next is not None
        self.assertEqual(ks.next.created, START + DAY)
        self.assertEqual(ks.previous, ())
        self.assertEqual(ks.keys, [ks.current, ks.next])
        self.assertFalse(ks.rotation_due(START))
        self.assertIs(ks.at(START + DAY - 1), ks)

    def test_seal_open(self) -> None:
        ks = KeySet.new(START, os.urandom, DAY)
        cookie = seal(ks)
        self.assertEqual(ks.open(cookie), KEYS)
        self.assertNotEqual(seal(ks), cookie)
        # A peer that promoted the next key a moment earlier: we open its cookies.
        assert ks.next is not None
        self.assertEqual(ks.open(ks.next.seal(KEYS, bytes(16))), KEYS)

    def test_promotion_rotation_and_grace(self) -> None:
        ks = KeySet.new(START, os.urandom, DAY, 2)
        first = ks.current
        cookie = seal(ks)
        ks = ks.at(START + DAY)
        assert ks.next is None
        self.assertEqual(ks.current.created, START + DAY)
        self.assertEqual(ks.previous, (first,))
        self.assertTrue(ks.rotation_due(START + DAY))
        ks = ks.rotated(START + DAY + 1, os.urandom)
        assert ks.next is not None
        # On schedule: a period after the current key, not after "now".
        self.assertEqual(ks.next.created, START + 2 * DAY)
        self.assertFalse(ks.rotation_due(START + DAY + 1))
        self.assertIs(ks.rotated(START + DAY + 1, os.urandom), ks)
        # Retired at START + DAY, the first key opens for two more periods.
        ks = ks.rotated(START + 2 * DAY, os.urandom)
        self.assertEqual(len(ks.keys), 4)  # two previous, current, next
        ks = ks.at(START + 3 * DAY - 0.001)
        self.assertEqual(ks.open(cookie), KEYS)
        ks = ks.rotated(START + 3 * DAY, os.urandom)
        self.assertIsNone(ks.open(cookie))
        self.assertNotIn(first, ks.keys)
        self.assertEqual(len(ks.keys), 4)

    def test_late_rotation(self) -> None:
        """The current key is past its period (saves failed): the next key
        comes half a period from now, and the previous key's grace counts
        from then."""
        ks = KeySet.new(START, os.urandom, DAY, 1).at(START + DAY)
        old = ks.current
        cookie = seal(ks)
        late = START + 5 * DAY
        at_late = ks.at(late)
        self.assertEqual(at_late.current, old)  # still sealing: nothing newer saved
        self.assertTrue(at_late.rotation_due(late))
        ks = at_late.rotated(late, os.urandom)
        assert ks.next is not None
        self.assertEqual(ks.current, old)
        self.assertEqual(ks.next.created, late + DAY / 2)
        ks = ks.at(late + DAY / 2 + DAY - 1)
        self.assertEqual(ks.open(cookie), KEYS)
        self.assertIsNone(ks.at(late + DAY / 2 + DAY).open(cookie))

    def test_idle_gap_expires_previous(self) -> None:
        ks = KeySet.new(START, os.urandom, DAY, 2).at(START + DAY)
        cookie = seal(ks)
        old = ks.previous[0]
        later = KeySet.from_keys(ks.keys, START + 10 * DAY, DAY, 2)
        self.assertEqual(later.current, ks.current)  # the newest saved key
        self.assertEqual(later.previous, ())
        self.assertNotIn(old, later.keys)
        self.assertEqual(later.open(cookie), KEYS)
        self.assertTrue(later.rotation_due(START + 10 * DAY))

    def test_grace_zero(self) -> None:
        ks = KeySet.new(START, os.urandom, 10.0, 0)
        cookie = seal(ks)
        self.assertIsNone(ks.at(START + 10.0).open(cookie))

    def test_from_keys(self) -> None:
        a, b, c, d = (key(n, START + n * DAY) for n in (1, 2, 3, 4))
        ks = KeySet.from_keys([d, b, a, c], START + 2.5 * DAY, DAY, 2)
        self.assertEqual((ks.current, ks.next, ks.previous), (b, c, (a,)))
        # Only one next key; keys beyond it are left out.
        self.assertEqual(ks.keys, [a, b, c])
        # The clock went back before every key: the oldest seals.
        back = KeySet.from_keys([c, b], START, DAY, 2)
        self.assertEqual((back.current, back.next), (b, c))
        self.assertFalse(back.rotation_due(START))
        with self.assertRaises(ValueError):
            KeySet.from_keys([], START)

    def test_invalid(self) -> None:
        a = key(1, START)
        for bad in (
            {"rotate": 0.0},
            {"rotate": float("inf")},
            {"rotate": float("nan")},
            {"grace": -1},
            {"next": key(1, START + 1)},
            {"previous": (key(1, START - 1),)},
        ):
            with self.assertRaises(ValueError, msg=bad):
                KeySet(a, **bad)

    def test_key_ids_unique(self) -> None:
        draws = iter([b"\x00\x00\x00\x01", bytes(64), b"\x00\x00\x00\x01"])

        def random(n: int) -> bytes:
            return next(draws, b"\x00\x00\x00\x02" if n == 4 else bytes(n))

        ks = KeySet.new(START, random, DAY)
        assert ks.next is not None
        self.assertEqual([k.key_id for k in ks.keys], [1, 2])

    def test_open_unknown_or_short(self) -> None:
        ks = KeySet.new(START, os.urandom, DAY)
        self.assertIsNone(ks.open(key(0xDEAD, START).seal(KEYS, bytes(16))))
        self.assertIsNone(ks.open(b""))
        self.assertIsNone(ks.open(b"ab"))
        cookie = seal(ks)
        self.assertIsNone(ks.open(cookie[:-1]))
        self.assertIsNone(ks.open(cookie[:20]))

    def test_holder(self) -> None:
        holder = KeyHolder()
        with self.assertRaises(AttributeError):
            holder.key_set  # noqa: B018 - unset until loaded
        ks = KeySet.new(START, os.urandom)
        holder.key_set = ks
        self.assertIs(KeyHolder(ks).key_set, ks)
        with self.assertRaises(AttributeError):
            holder.other = 1  # type: ignore[attr-defined]

    def test_holder_is_the_responders_cookie_jar(self) -> None:
        """Each seal and open uses the key set current at that moment."""
        holder = KeyHolder(KeySet.new(START, os.urandom, DAY), random=bytes)
        cookie = holder.seal(KEYS)
        self.assertEqual(cookie[4:20], bytes(16))  # the injected nonce
        self.assertEqual(cookie_key_id(cookie), holder.key_set.current.key_id)
        self.assertEqual(holder.open(cookie), KEYS)
        holder.key_set = holder.key_set.at(START + DAY)
        promoted = holder.seal(KEYS)
        self.assertEqual(cookie_key_id(promoted), holder.key_set.current.key_id)
        self.assertNotEqual(cookie_key_id(promoted), cookie_key_id(cookie))
        self.assertEqual(holder.open(cookie), KEYS)
        holder.key_set = KeySet.new(START, os.urandom, DAY)
        self.assertIsNone(holder.open(cookie))


class PropertyTests(unittest.TestCase):
    ks = KeySet.new(START, os.urandom, DAY, 2)

    @given(st.binary(max_size=200))
    def test_open_any_bytes(self, data: bytes) -> None:
        self.assertIsNone(self.ks.open(data))

    @given(st.binary(max_size=200), st.sampled_from([0, 1]))
    def test_open_any_bytes_under_our_key_ids(self, data: bytes, which: int) -> None:
        key_id = self.ks.keys[which].key_id.to_bytes(4, "big")
        self.assertIsNone(self.ks.open(key_id + data))

    @given(
        st.lists(st.floats(0.0, 3 * DAY), min_size=1, max_size=40),
        st.integers(0, 3),
    )
    def test_schedule(self, steps: list[float], grace: int) -> None:
        """Ticking at any pace: a cookie opens for at least *grace* periods
        after it was sealed, the current key was created at or before now,
        the next after it, and the set stays small."""
        now = START
        ks = KeySet.new(now, os.urandom, DAY, grace)
        sealed: list[tuple[float, bytes]] = []
        for step in steps:
            now += step
            ks = ks.at(now)
            if ks.rotation_due(now):
                ks = ks.rotated(now, os.urandom)
            self.assertLessEqual(ks.current.created, now)
            assert ks.next is not None
            self.assertGreater(ks.next.created, now)
            self.assertLessEqual(len(ks.keys), grace + 2)
            for when, cookie in sealed:
                if now < when + grace * DAY:
                    self.assertEqual(ks.open(cookie), KEYS)
            sealed.append((now, seal(ks)))
