"""Master keys derived from a fleet secret: the pure derivation, and the
service that swaps in each period's set on a ``task.Clock``."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from udptime.nts.cookies import COOKIE_NONCE_LENGTH, CookieKeys, cookie_key_id
from udptime.nts.derivedkeys import (
    MIN_SECRET_LENGTH,
    SecretError,
    derive_key,
    derived_key_set,
    fingerprint,
    next_change,
    parse_secret,
    period_of,
)
from udptime.nts.keysecret import MAX_WAIT, KeySecretService, read_secret
from udptime.nts.keyset import KeyHolder

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))
ROTATE = 100.0
START = 1_700_000_000.0  # a period boundary for ROTATE
KEYS = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))


def seal(key_set_holder: KeyHolder) -> bytes:
    return key_set_holder.seal(KEYS)


class DerivationTests(unittest.TestCase):
    def test_same_secret_same_keys_anywhere(self) -> None:
        """Two hosts derive equal sets at any moment of the same period."""
        one = derived_key_set(SECRET, START + 1, rotate=ROTATE)
        two = derived_key_set(SECRET, START + 99.5, rotate=ROTATE)
        self.assertEqual(one, two)
        other = derived_key_set(OTHER, START + 1, rotate=ROTATE)
        self.assertNotEqual(one.current.key, other.current.key)
        self.assertNotEqual(one.current.key_id, other.current.key_id)

    def test_key_depends_on_secret_period_and_length(self) -> None:
        key = derive_key(SECRET, 17_000_000, ROTATE)
        self.assertEqual(key.created, 17_000_000 * ROTATE)
        self.assertEqual(len(key.key), 64)
        self.assertEqual(derive_key(SECRET, 17_000_000, ROTATE), key)
        for different in (
            derive_key(SECRET, 17_000_001, ROTATE),
            derive_key(SECRET, 17_000_000, 50.0),
            derive_key(OTHER, 17_000_000, ROTATE),
        ):
            self.assertNotEqual(different.key, key.key)
            self.assertNotEqual(different.key_id, key.key_id)

    def test_known_answer(self) -> None:
        """Pinned, so that a change of derivation is never silent: hosts of
        two versions would stop opening each other's cookies."""
        key = derive_key(SECRET, 1, 86_400.0)
        self.assertEqual(
            (key.key_id, key.key[:8].hex(), fingerprint(SECRET)),
            KNOWN_ANSWER,
        )

    def test_schedule(self) -> None:
        grace = 2
        ks = derived_key_set(SECRET, START + 10, rotate=ROTATE, grace=grace)
        n = period_of(START + 10, ROTATE)
        self.assertEqual(ks.current, derive_key(SECRET, n, ROTATE))
        self.assertEqual(ks.next, derive_key(SECRET, n + 1, ROTATE))
        self.assertEqual(
            ks.previous,
            (derive_key(SECRET, n - 1, ROTATE), derive_key(SECRET, n - 2, ROTATE)),
        )
        self.assertEqual(ks.accepted, ())
        # What the keys file's schedule would make of the same keys.
        self.assertEqual(ks.at(START + 10), ks)

    def test_cookie_lifetime(self) -> None:
        """A cookie opens in its own period and *grace* more, then not."""
        holder = KeyHolder(derived_key_set(SECRET, START, rotate=ROTATE, grace=2))
        cookie = seal(holder)
        for later, opens in ((99.9, True), (100, True), (299.9, True), (300, False)):
            ks = derived_key_set(SECRET, START + later, rotate=ROTATE, grace=2)
            self.assertEqual(ks.open(cookie) is not None, opens, later)

    def test_peer_ahead(self) -> None:
        """A host whose clock passed the boundary already seals with the
        next key: a host still before it opens that cookie."""
        ahead = KeyHolder(derived_key_set(SECRET, START + ROTATE, rotate=ROTATE))
        behind = derived_key_set(SECRET, START + ROTATE - 0.5, rotate=ROTATE)
        self.assertEqual(behind.open(seal(ahead)), KEYS)

    def test_accepted_secret_opens_never_seals(self) -> None:
        old = KeyHolder(derived_key_set(OTHER, START, rotate=ROTATE))
        old_cookie = seal(old)
        both = KeyHolder(
            derived_key_set(SECRET, START + 5, rotate=ROTATE, accepted=[OTHER])
        )
        self.assertEqual(both.open(old_cookie), KEYS)
        new_cookie = seal(both)
        self.assertEqual(
            cookie_key_id(new_cookie),
            derive_key(SECRET, period_of(START, ROTATE), ROTATE).key_id,
        )
        # A host that has not been given the new secret yet cannot open it:
        # that is why the new secret is accepted everywhere first.
        self.assertIsNone(old.open(new_cookie))
        self.assertEqual(old.open(old_cookie), KEYS)
        without = derived_key_set(SECRET, START + 5, rotate=ROTATE)
        self.assertIsNone(without.open(old_cookie))

    def test_wrong_secret_does_not_open(self) -> None:
        cookie = seal(KeyHolder(derived_key_set(SECRET, START, rotate=ROTATE)))
        self.assertIsNone(derived_key_set(OTHER, START, rotate=ROTATE).open(cookie))

    def test_next_change(self) -> None:
        self.assertEqual(next_change(START, ROTATE), START + ROTATE)
        self.assertEqual(next_change(START + 99.9, ROTATE), START + ROTATE)

    def test_early_periods(self) -> None:
        ks = derived_key_set(SECRET, 5.0, rotate=ROTATE)
        self.assertEqual(ks.previous, ())
        self.assertEqual(ks.current.created, 0.0)

    @given(
        st.floats(min_value=0, max_value=4e9),
        st.floats(min_value=0.5, max_value=1e6),
        st.integers(min_value=0, max_value=5),
    )
    def test_any_moment(self, now: float, rotate: float, grace: int) -> None:
        ks = derived_key_set(SECRET, now, rotate=rotate, grace=grace)
        self.assertLessEqual(ks.current.created, now)
        self.assertLessEqual(len(ks.previous), grace)
        self.assertEqual(ks.open(ks.seal(KEYS, bytes(COOKIE_NONCE_LENGTH))), KEYS)


class ParseTests(unittest.TestCase):
    def test_hex_with_white_space(self) -> None:
        self.assertEqual(parse_secret(SECRET.hex().encode() + b"\n"), SECRET)
        self.assertEqual(parse_secret(b"  " + SECRET.hex().upper().encode()), SECRET)

    def test_refused(self) -> None:
        for raw in (
            b"",
            b"zz" * 32,
            bytes(MIN_SECRET_LENGTH - 1).hex().encode(),
            SECRET,  # raw bytes, not hex
            "é".encode(),
        ):
            with self.assertRaises(SecretError, msg=raw):
                parse_secret(raw)

    @given(st.binary(max_size=200))
    def test_any_bytes(self, raw: bytes) -> None:
        try:
            secret = parse_secret(raw)
        except SecretError:
            return
        self.assertGreaterEqual(len(secret), MIN_SECRET_LENGTH)


class FileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="udptime-secret-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name: str, data: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        return path

    def test_read(self) -> None:
        self.assertEqual(read_secret(self.write("s", SECRET.hex().encode())), SECRET)
        self.assertEqual(
            read_secret(self.write("r", SECRET.hex().encode(), 0o400)), SECRET
        )

    def test_mode_refused(self) -> None:
        for mode in (0o640, 0o604, 0o644):
            path = self.write(f"m{mode:o}", SECRET.hex().encode(), mode)
            with self.assertRaises(SecretError) as caught:
                read_secret(path)
            self.assertIn(f"{mode:04o}", str(caught.exception))

    def test_missing(self) -> None:
        with self.assertRaises(SecretError):
            read_secret(os.path.join(self.dir, "nothing"))


class ServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="udptime-secret-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.clock = Clock()
        self.clock.advance(START + 30)
        self.path = self.write("fleet.secret", SECRET)

    def write(self, name: str, secret: bytes, mode: int = 0o600) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(secret.hex() + "\n")
        os.chmod(path, mode)
        return path

    def service(self, accepted: tuple[str, ...] = ()) -> KeySecretService:
        svc = KeySecretService(
            self.path, self.clock, accepted=accepted, rotate=ROTATE, grace=1
        )
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def test_swaps_in_each_period_on_time(self) -> None:
        svc = self.service()
        first = svc.holder.key_set
        self.assertEqual(first, derived_key_set(SECRET, START, rotate=ROTATE, grace=1))
        cookie = svc.holder.seal(KEYS)
        self.clock.advance(69.9)  # START + 99.9
        self.assertIs(svc.holder.key_set, first)
        self.clock.advance(0.1)  # the boundary
        second = svc.holder.key_set
        self.assertEqual(second.current, first.next)
        self.assertEqual(svc.holder.open(cookie), KEYS)
        self.clock.advance(ROTATE - 0.1)  # the last moment of grace (1 period)
        self.assertEqual(svc.holder.open(cookie), KEYS)
        self.clock.advance(0.1)
        self.assertIsNone(svc.holder.open(cookie))
        # One timer at a time, never further out than MAX_WAIT.
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertLessEqual(
            self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds(), MAX_WAIT
        )

    def test_clock_step_caught_up(self) -> None:
        svc = KeySecretService(self.path, self.clock, rotate=3600.0)
        svc.startService()
        self.addCleanup(svc.stopService)
        before = svc.holder.key_set.current
        # The wall clock steps forward a day; the timer, due in MAX_WAIT or
        # less, derives from the clock as it reads then.
        self.clock.rightNow += 86_400
        self.clock.advance(MAX_WAIT)
        after = svc.holder.key_set.current
        self.assertEqual(
            after, derive_key(SECRET, period_of(self.clock.seconds(), 3600.0), 3600.0)
        )
        self.assertNotEqual(before, after)

    def test_stop_cancels_timer(self) -> None:
        svc = KeySecretService(self.path, self.clock, rotate=ROTATE)
        svc.startService()
        svc.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_accepted_and_reload(self) -> None:
        other = self.write("old.secret", OTHER)
        old_cookie = KeyHolder(derived_key_set(OTHER, START, rotate=ROTATE)).seal(KEYS)
        svc = self.service(accepted=(other,))
        self.assertEqual(svc.holder.open(old_cookie), KEYS)
        # Retire it: the file now holds the sealing secret too (what an
        # operator distributes), and SIGHUP reloads.
        self.write("old.secret", SECRET)
        line = svc.reload()
        self.assertIn(fingerprint(SECRET), line)
        self.assertIsNone(svc.holder.open(old_cookie))
        # A broken file on reload keeps what is in memory.
        os.chmod(other, 0o644)
        line = svc.reload()
        self.assertIn("kept", line)
        self.assertIn("0644", line)
        self.assertIn("--nts-key-secret-accept", line)

    def test_bad_file_exits_at_start(self) -> None:
        os.chmod(self.path, 0o644)
        svc = KeySecretService(self.path, self.clock, rotate=ROTATE)
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as caught:
            svc.startService()
        self.assertEqual(caught.exception.code, 1)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1)
        self.assertIn(f"--nts-key-secret {self.path}: mode 0644", lines[0])
        self.assertFalse(svc.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])


# RFC 5869 HKDF by hand (hmac, hashlib) gives the same.
KNOWN_ANSWER = (804341150, "bd5e105602c40c4a", "02e5ebb8")
