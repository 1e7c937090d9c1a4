"""The Merkle tree over one batch of requests (RFC 10049 section 5.3).

Leaves are ``H(0x00 || request packet)``, inner nodes
``H(0x01 || left || right)``, ``H`` being SHA-512 cut to 32 bytes. The client
walks up from its leaf taking one PATH hash per level, the level's bit of
INDX saying on which side its own node sits (section 5.3.1). That walk only
works on a tree whose every level is full, so a batch whose size is not a
power of two is padded with :data:`PADDING`, 32 zero bytes: a value no leaf
hash takes, so that no INDX but the right one leads from a request to the
root (repeating the last leaf, as some servers do, lets its INDX be bent
without the client noticing).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from udptime.roughtime.wire import HASH_SIZE, MAX_PATH_HASHES, digest

LEAF_PREFIX = b"\x00"
NODE_PREFIX = b"\x01"
PADDING = bytes(HASH_SIZE)


def leaf_hash(data: bytes) -> bytes:
    return digest(LEAF_PREFIX + data)


def node_hash(left: bytes, right: bytes) -> bytes:
    return digest(NODE_PREFIX + left + right)


class MerkleTree:
    """A full binary tree over the leaf hashes of *leaves*, built once."""

    __slots__ = ("_levels", "size")

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not leaves:
            raise ValueError("a Merkle tree needs at least one leaf")
        sha512 = hashlib.sha512
        level = [sha512(LEAF_PREFIX + leaf).digest()[:HASH_SIZE] for leaf in leaves]
        self.size = len(level)
        width = 1
        while width < len(level):
            width *= 2
        if width > 1 << MAX_PATH_HASHES:
            raise ValueError("tree deeper than a PATH may be")
        level.extend([PADDING] * (width - len(level)))
        levels = [level]
        while len(level) > 1:
            level = [
                sha512(NODE_PREFIX + level[i] + level[i + 1]).digest()[:HASH_SIZE]
                for i in range(0, len(level), 2)
            ]
            levels.append(level)
        self._levels = levels

    @property
    def root(self) -> bytes:
        return self._levels[-1][0]

    @property
    def height(self) -> int:
        """PATH hashes per leaf: 0 for a single leaf."""
        return len(self._levels) - 1

    def path(self, index: int) -> bytes:
        """The PATH value for leaf *index*: its siblings, leaf upwards."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        siblings = []
        for level in self._levels[:-1]:
            siblings.append(level[index ^ 1])
            index >>= 1
        return b"".join(siblings)

    def paths(self) -> list[bytes]:
        """:meth:`path` of every leaf in order, computed level by level."""
        size = self.size
        columns = []
        for depth, level in enumerate(self._levels[:-1]):
            siblings = [level[k ^ 1] for k in range(len(level))]
            repeat = 1 << depth  # leaf i's node at this depth is i >> depth
            if repeat > 1:
                siblings = [node for node in siblings for _ in range(repeat)]
            columns.append(siblings[:size])
        if not columns:
            return [b""] * size
        return list(map(b"".join, zip(*columns, strict=True)))


def root_from_path(leaf: bytes, index: int, path: Sequence[bytes]) -> bytes | None:
    """The root a client computes (section 5.3.1), or ``None`` when bits of
    INDX are left over once PATH is used up (or a PATH entry is misshapen)."""
    node = leaf_hash(leaf)
    for sibling in path:
        if len(sibling) != HASH_SIZE:
            return None
        if index & 1:
            node = node_hash(sibling, node)
        else:
            node = node_hash(node, sibling)
        index >>= 1
    if index:
        return None
    return node


def verify_path(leaf: bytes, index: int, path: Sequence[bytes], root: bytes) -> bool:
    return root_from_path(leaf, index, path) == root
