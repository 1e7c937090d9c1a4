"""The Merkle tree over a batch (RFC 10049 section 5.3)."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.roughtime.merkle import (
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_path,
    verify_path,
)


def h(data: bytes) -> bytes:
    return hashlib.sha512(data).digest()[:32]


def leaves(count: int) -> list[bytes]:
    return [b"request %d" % i for i in range(count)]


def split(path: bytes) -> list[bytes]:
    return [path[i : i + 32] for i in range(0, len(path), 32)]


class MerkleTests(unittest.TestCase):
    def test_hashes(self) -> None:
        self.assertEqual(leaf_hash(b"x"), h(b"\x00x"))
        self.assertEqual(
            node_hash(b"a" * 32, b"b" * 32), h(b"\x01" + b"a" * 32 + b"b" * 32)
        )

    def test_one_leaf(self) -> None:
        tree = MerkleTree([b"only"])
        self.assertEqual(tree.root, leaf_hash(b"only"))
        self.assertEqual(tree.height, 0)
        self.assertEqual(tree.path(0), b"")
        self.assertTrue(verify_path(b"only", 0, [], tree.root))
        self.assertFalse(verify_path(b"only", 1, [], tree.root))

    def test_two_and_three_leaves_by_hand(self) -> None:
        a, b, c = (leaf_hash(x) for x in (b"a", b"b", b"c"))
        self.assertEqual(MerkleTree([b"a", b"b"]).root, node_hash(a, b))
        three = MerkleTree([b"a", b"b", b"c"])
        pad = bytes(32)
        self.assertEqual(three.root, node_hash(node_hash(a, b), node_hash(c, pad)))
        self.assertEqual(split(three.path(2)), [pad, node_hash(a, b)])
        # The padding's place leads nowhere: only INDX 2 proves leaf c.
        self.assertFalse(verify_path(b"c", 3, split(three.path(2)), three.root))

    def test_sizes_leaf_by_leaf(self) -> None:
        for count in (1, 2, 3, 63, 64):
            data = leaves(count)
            tree = MerkleTree(data)
            self.assertEqual(tree.size, count)
            self.assertEqual(tree.height, (count - 1).bit_length())
            for index, leaf in enumerate(data):
                path = split(tree.path(index))
                self.assertEqual(len(path), tree.height)
                self.assertTrue(
                    verify_path(leaf, index, path, tree.root), (count, index)
                )
                other = (index + 1) % count
                if other != index:
                    self.assertFalse(verify_path(leaf, other, path, tree.root))
                    self.assertFalse(verify_path(data[other], index, path, tree.root))
                # INDX bits beyond the PATH must be zero.
                self.assertIsNone(
                    root_from_path(leaf, index + (1 << tree.height), path)
                )

    def test_padding_is_nobodys_index(self) -> None:
        tree = MerkleTree(leaves(3))
        self.assertRaises(IndexError, tree.path, 3)
        self.assertRaises(IndexError, tree.path, -1)
        self.assertRaises(ValueError, MerkleTree, [])

    def test_misshapen_path(self) -> None:
        tree = MerkleTree(leaves(2))
        self.assertIsNone(root_from_path(b"request 0", 0, [tree.path(0)[:31]]))

    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=70), st.data())
    def test_any_batch(self, data: list[bytes], draw: st.DataObject) -> None:
        tree = MerkleTree(data)
        index = draw.draw(st.integers(0, len(data) - 1))
        path = split(tree.path(index))
        self.assertEqual(root_from_path(data[index], index, path), tree.root)
        if path:
            which = draw.draw(st.integers(0, len(path) - 1))
            path[which] = bytes(a ^ 1 for a in path[which])
            self.assertNotEqual(root_from_path(data[index], index, path), tree.root)
