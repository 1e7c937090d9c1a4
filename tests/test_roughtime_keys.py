"""Root keys, delegations and their files."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

from twisted.trial import unittest

from udptime.roughtime import keys, wire

MINT = 1_800_000_000
MAXT = MINT + 86_400


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class KeyFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir)

    def test_root_key_round_trip(self) -> None:
        key = keys.generate_key()
        path = self.dir / "root.pem"
        keys.write_root_key(path, key)
        self.assertEqual(mode(path), 0o600)
        self.assertTrue(path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----"))
        loaded = keys.load_root_key(path)
        self.assertEqual(keys.public_bytes(loaded), keys.public_bytes(key))

    def test_root_key_not_overwritten(self) -> None:
        path = self.dir / "root.pem"
        keys.write_root_key(path, keys.generate_key())
        first = path.read_bytes()
        self.assertRaises(
            keys.KeyFileError, keys.write_root_key, path, keys.generate_key()
        )
        self.assertEqual(path.read_bytes(), first)
        keys.write_root_key(path, keys.generate_key(), overwrite=True)
        self.assertNotEqual(path.read_bytes(), first)

    def test_readable_by_others_refused(self) -> None:
        path = self.dir / "root.pem"
        keys.write_root_key(path, keys.generate_key())
        os.chmod(path, 0o640)
        with self.assertRaises(keys.KeyFileError) as caught:
            keys.load_root_key(path)
        self.assertIn("chmod 600", str(caught.exception))

    def test_not_a_key(self) -> None:
        path = self.dir / "root.pem"
        path.write_bytes(b"hello")
        os.chmod(path, 0o600)
        self.assertRaises(keys.KeyFileError, keys.load_root_key, path)
        self.assertRaises(keys.KeyFileError, keys.load_root_key, self.dir / "missing")

    def test_delegation_round_trip(self) -> None:
        root = keys.generate_key()
        delegation = keys.delegate(root, MINT, MAXT)
        path = self.dir / "host.json"
        keys.write_delegation(path, delegation)
        self.assertEqual(mode(path), 0o600)
        loaded = keys.load_delegation(path)
        self.assertEqual(loaded.root_public_key, keys.public_bytes(root))
        self.assertEqual((loaded.mint, loaded.maxt), (MINT, MAXT))
        self.assertEqual(loaded.cert, delegation.cert)
        self.assertEqual(
            keys.public_bytes(loaded.online_key),
            keys.public_bytes(delegation.online_key),
        )
        self.assertEqual(loaded.srv, wire.srv_value(keys.public_bytes(root)))

    def test_delegation_tampering_refused(self) -> None:
        delegation = keys.delegate(keys.generate_key(), MINT, MAXT)
        path = self.dir / "host.json"
        keys.write_delegation(path, delegation)
        good = json.loads(path.read_text())
        other = keys.delegate(keys.generate_key(), MINT, MAXT)
        edits: list[dict[str, object]] = [
            {"root_public_key": other.root_public_key},
            {"cert": other.cert},
            {"maxt": MAXT + 1},
            {"format": "something else"},
            {"version": 2},
            {"online_private_key": "not base64!"},
        ]
        for edit in edits:
            document = dict(good)
            for name, value in edit.items():
                if isinstance(value, bytes):
                    value = base64.b64encode(value).decode()
                document[name] = value
            path.write_text(json.dumps(document))
            self.assertRaises(keys.KeyFileError, keys.load_delegation, path)
        path.write_text("[]")
        self.assertRaises(keys.KeyFileError, keys.load_delegation, path)

    def test_delegation_checks(self) -> None:
        root = keys.generate_key()
        delegation = keys.delegate(root, MINT, MAXT)
        self.assertTrue(delegation.valid_at(MINT))
        self.assertTrue(delegation.valid_at(MAXT))
        self.assertFalse(delegation.valid_at(MAXT + 1))
        self.assertRaises(ValueError, keys.delegate, root, MAXT, MINT)
        self.assertRaises(
            ValueError,
            keys.check_delegation,
            delegation.root_public_key,
            keys.generate_key(),
            delegation.cert,
        )
        checked = keys.check_delegation(
            delegation.root_public_key, delegation.online_key, delegation.cert
        )
        self.assertEqual((checked.mint, checked.maxt), (MINT, MAXT))
