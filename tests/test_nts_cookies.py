"""Stateless cookies and the master key store: sealing, rotation, the keys file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    KeyFileError,
    KeyStore,
    MasterKey,
    cookie_key_id,
    cookie_length,
    decode_keys_file,
    encode_keys_file,
)

DAY = 86_400.0
START = 1_700_000_000.0
KEYS = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))


class FakeClock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def master(key_id: int = 7, created: float = START) -> MasterKey:
    return MasterKey(key_id, os.urandom(64), created)


class CookieTests(unittest.TestCase):
    def test_seal_open(self) -> None:
        key = master()
        cookie = key.seal(KEYS, os.urandom(COOKIE_NONCE_LENGTH))
        self.assertEqual(len(cookie), cookie_length())
        self.assertEqual(len(cookie), 104)
        self.assertEqual(len(cookie) % 4, 0)
        self.assertEqual(cookie_key_id(cookie), 7)
        self.assertEqual(key.open(cookie), KEYS)

    def test_cookies_differ_and_hide_keys(self) -> None:
        key = master()
        a = key.seal(KEYS, os.urandom(16))
        b = key.seal(KEYS, os.urandom(16))
        self.assertNotEqual(a, b)
        self.assertNotIn(KEYS.c2s[:8], a)

    def test_tampering_fails(self) -> None:
        key = master()
        cookie = key.seal(KEYS, os.urandom(16))
        for i in range(4, len(cookie)):
            forged = bytearray(cookie)
            forged[i] ^= 0x01
            self.assertIsNone(key.open(bytes(forged)), i)
        self.assertIsNone(key.open(cookie[:-1]))
        self.assertIsNone(key.open(cookie[:20]))
        self.assertIsNone(master(8).open(cookie))
        self.assertIsNone(MasterKey(7, os.urandom(64), START).open(cookie))

    @given(st.binary(max_size=200))
    def test_open_any_bytes(self, data: bytes) -> None:
        self.assertIsNone(master().open(data))

    def test_plaintext_checks(self) -> None:
        self.assertEqual(CookieKeys.from_plaintext(KEYS.plaintext()), KEYS)
        self.assertIsNone(CookieKeys.from_plaintext(b"\x00"))
        self.assertIsNone(CookieKeys.from_plaintext(b"\x00\x0f\x00\x01" + bytes(64)))
        self.assertIsNone(CookieKeys.from_plaintext(b"\x00\x1e\x00\x00" + bytes(64)))
        self.assertIsNone(CookieKeys.from_plaintext(KEYS.plaintext()[:-1]))
        with self.assertRaises(ValueError):
            CookieKeys(30, bytes(32), bytes(32))
        with self.assertRaises(ValueError):
            CookieKeys(15, bytes(16), bytes(32))
        with self.assertRaises(ValueError):
            MasterKey(2**32, bytes(64), 0.0)
        with self.assertRaises(ValueError):
            MasterKey(1, bytes(32), 0.0)
        with self.assertRaises(ValueError):
            master().seal(KEYS, bytes(8))


class MemoryStoreTests(unittest.TestCase):
    def test_rotation_and_grace(self) -> None:
        clock = FakeClock()
        store = KeyStore(None, clock, rotate=DAY, grace=2)
        store.load()
        first = store.current()
        cookie = store.seal(KEYS)
        clock.now += DAY - 1
        self.assertIs(store.current(), first)
        clock.now += 1
        second = store.current()
        self.assertIsNot(second, first)
        self.assertEqual(store.open(cookie), KEYS)
        self.assertEqual(len(store.keys), 2)
        # Two more rotations: the first key still opens until its grace ends.
        clock.now += DAY
        store.current()
        self.assertEqual(store.open(cookie), KEYS)
        clock.now += DAY
        store.current()
        self.assertIsNone(store.open(cookie))
        self.assertNotIn(first, store.keys)
        self.assertEqual(store.rotations, 4)

    def test_idle_gap_expires_everything(self) -> None:
        clock = FakeClock()
        store = KeyStore(None, clock, rotate=DAY, grace=2)
        store.load()
        cookie = store.seal(KEYS)
        clock.now += 10 * DAY
        self.assertIsNone(store.open(cookie))
        self.assertEqual(len(store.keys), 1)

    def test_clock_stepped_back_far(self) -> None:
        clock = FakeClock()
        store = KeyStore(None, clock, rotate=DAY)
        store.load()
        first = store.current()
        clock.now -= 3 * DAY
        self.assertIsNot(store.current(), first)

    def test_grace_zero(self) -> None:
        clock = FakeClock()
        store = KeyStore(None, clock, rotate=10.0, grace=0)
        store.load()
        cookie = store.seal(KEYS)
        clock.now += 10.0
        self.assertIsNone(store.open(cookie))

    def test_arguments(self) -> None:
        with self.assertRaises(ValueError):
            KeyStore(None, FakeClock(), rotate=0)
        with self.assertRaises(ValueError):
            KeyStore(None, FakeClock(), grace=-1)

    def test_unknown_key_id(self) -> None:
        store = KeyStore(None, FakeClock())
        store.load()
        self.assertIsNone(store.open(master(12345).seal(KEYS, bytes(16))))
        self.assertIsNone(store.open(b"ab"))

    def test_key_ids_unique(self) -> None:
        values = iter(
            [
                b"\x00\x00\x00\x01",
                bytes(64),
                b"\x00\x00\x00\x01",
                b"\x00\x00\x00\x02",
                bytes(64),
            ]
        )
        clock = FakeClock()
        store = KeyStore(None, clock, rotate=1.0, random=lambda n: next(values))
        store.load()
        clock.now += 1
        store.current()
        self.assertEqual([k.key_id for k in store.keys], [1, 2])


class FileStoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="udptime-nts-keys-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "keys.json")
        self.clock = FakeClock()

    def store(self, **kwargs: float) -> KeyStore:
        store = KeyStore(self.path, self.clock, rotate=DAY, **kwargs)  # type: ignore[arg-type]
        store.load()
        return store

    def test_created_0600_and_restart_opens(self) -> None:
        store = self.store()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        cookie = store.seal(KEYS)
        restarted = self.store()
        self.assertEqual(restarted.open(cookie), KEYS)
        self.assertEqual(restarted.current(), store.current())
        self.assertFalse(
            any(name.startswith("keys.json.tmp") for name in os.listdir(self.dir))
        )

    def test_file_format(self) -> None:
        store = self.store()
        with open(self.path, "rb") as f:
            document = json.loads(f.read())
        self.assertEqual(document["format"], "udptime-nts-keys")
        self.assertEqual(document["version"], 1)
        (entry,) = document["keys"]
        self.assertEqual(entry["id"], store.current().key_id)
        self.assertEqual(bytes.fromhex(entry["key"]), store.current().key)
        self.assertEqual(decode_keys_file(encode_keys_file(store.keys)), store.keys)

    def test_loose_permissions_tightened(self) -> None:
        self.store()
        os.chmod(self.path, 0o644)
        self.store()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_rotation_persisted_and_shared(self) -> None:
        a = self.store()
        b = self.store()
        old = a.seal(KEYS)
        self.clock.now += DAY
        fresh = a.seal(KEYS)  # a rotates and writes the file
        self.assertEqual(a.rotations, 2)
        # b notices the changed file at its next check instead of rotating itself.
        self.assertEqual(b.open(fresh), KEYS)
        self.assertEqual(b.open(old), KEYS)
        self.assertEqual(b.current(), a.current())
        self.assertEqual(b.rotations, 0)
        self.assertGreaterEqual(b.reloads, 1)
        with open(self.path, "rb") as f:
            self.assertEqual(len(decode_keys_file(f.read())), 2)

    def test_unknown_key_rechecks_file(self) -> None:
        a = self.store(check_interval=3600.0)
        b = self.store(check_interval=3600.0)
        self.clock.now += 1.0
        # Someone rotates out of schedule (another server sharing the file).
        os.unlink(self.path)
        c = self.store()
        cookie = c.seal(KEYS)
        self.assertNotEqual(c.current(), a.current())
        self.assertEqual(b.open(cookie), KEYS)

    def test_corrupt_file_refused_at_start(self) -> None:
        def document(**fields: object) -> bytes:
            return json.dumps(
                {"format": "udptime-nts-keys", "version": 1, **fields}
            ).encode()

        key = master(3).to_json()
        for content in (
            b"not json",
            b"[]",
            document(version=9),
            document(keys={}),
            document(keys=[1]),
            document(keys=[{"id": 1}]),
            document(keys=[{"id": "x", "created": 1, "key": "00"}]),
            document(keys=[{"id": 1, "created": 1, "key": 5}]),
            document(keys=[{"id": 1, "created": 1, "key": "zz"}]),
            document(keys=[{"id": 1, "created": 1, "key": "00"}]),
            document(keys=[key, key]),
        ):
            with open(self.path, "wb") as f:
                f.write(content)
            with self.assertRaises(KeyFileError, msg=content):
                self.store()

    def test_corrupt_file_at_runtime_keeps_keys(self) -> None:
        store = self.store()
        cookie = store.seal(KEYS)
        with open(self.path, "wb") as f:
            f.write(b"garbage")
        self.clock.now += 2
        self.assertEqual(store.open(cookie), KEYS)

    def test_unwritable_directory_at_runtime(self) -> None:
        store = self.store()
        cookie = store.seal(KEYS)
        os.unlink(self.path)
        os.unlink(self.path + ".lock")
        os.rmdir(self.dir)
        self.clock.now += DAY
        fresh = store.seal(KEYS)  # rotates in memory, logs the failure
        self.assertEqual(store.open(fresh), KEYS)
        self.assertEqual(store.open(cookie), KEYS)
        self.flushLoggedErrors()

    def test_missing_directory_at_start(self) -> None:
        store = KeyStore(os.path.join(self.dir, "no", "keys.json"), self.clock)
        with self.assertRaises(KeyFileError):
            store.load()
