"""Stateless cookies, one master key's seal and open, the keys file's JSON."""

from __future__ import annotations

import json
import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    KeyFileError,
    MasterKey,
    cookie_key_id,
    cookie_length,
    decode_keys_file,
    encode_keys_file,
)

DAY = 86_400.0
START = 1_700_000_000.0
KEYS = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))


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


class KeysFileFormatTests(unittest.TestCase):
    def test_round_trip(self) -> None:
        keys = [master(1, START), master(2, START + DAY)]
        raw = encode_keys_file(keys)
        document = json.loads(raw)
        self.assertEqual(document["format"], "udptime-nts-keys")
        self.assertEqual(document["version"], 1)
        self.assertEqual(document["keys"][0]["id"], 1)
        self.assertEqual(bytes.fromhex(document["keys"][0]["key"]), keys[0].key)
        self.assertEqual(decode_keys_file(raw), keys)

    def test_file_of_earlier_versions_loads(self) -> None:
        """Written by the KeyStore of earlier releases: one key, created an
        hour ago; the ids are unsigned 32-bit, the times POSIX floats."""
        raw = (
            '{\n "format": "udptime-nts-keys",\n "version": 1,\n "keys": [\n  {\n'
            '   "id": 4294967295,\n   "created": 1699996400.25,\n'
            f'   "key": "{"ab" * 64}"\n  }}\n ]\n}}\n'
        ).encode()
        (key,) = decode_keys_file(raw)
        self.assertEqual(key, MasterKey(0xFFFF_FFFF, b"\xab" * 64, 1699996400.25))

    def test_sorted_oldest_first(self) -> None:
        keys = [master(1, START + 5), master(2, START)]
        self.assertEqual(decode_keys_file(encode_keys_file(keys)), keys[::-1])

    def test_malformed(self) -> None:
        def document(**fields: object) -> bytes:
            return json.dumps(
                {"format": "udptime-nts-keys", "version": 1, **fields}
            ).encode()

        key = master(3).to_json()
        for content in (
            b"not json",
            b"\xff\xfe",
            b"[]",
            json.dumps({"format": "other", "version": 1, "keys": []}).encode(),
            document(version=9),
            document(keys={}),
            document(keys=[1]),
            document(keys=[{"id": 1}]),
            document(keys=[{"id": "x", "created": 1, "key": "00"}]),
            document(keys=[{"id": 1, "created": 1, "key": 5}]),
            document(keys=[{"id": 1, "created": 1, "key": "zz"}]),
            document(keys=[{"id": 1, "created": 1, "key": "00"}]),
            document(keys=[key, key]),
            document(keys=[{"id": 1, "created": 10**400, "key": "00" * 64}]),
        ):
            with self.assertRaises(KeyFileError, msg=content):
                decode_keys_file(content)

    @given(st.binary(max_size=300))
    def test_decode_any_bytes(self, data: bytes) -> None:
        try:
            decode_keys_file(data)
        except KeyFileError:
            pass
