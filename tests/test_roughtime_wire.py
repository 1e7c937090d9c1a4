"""Roughtime messages, packets and requests (RFC 10049 sections 4 and 5)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.roughtime import wire

NONCE = bytes(range(32))

tags = st.integers(min_value=0, max_value=2**32 - 1)
aligned = st.integers(min_value=0, max_value=16).flatmap(
    lambda n: st.binary(min_size=4 * n, max_size=4 * n)
)


def raw_message(
    count: int, offsets: list[int], tag_values: list[int], body: bytes
) -> bytes:
    """A message header written by hand, right or wrong."""
    return (
        struct.pack(
            f"<I{len(offsets)}I{len(tag_values)}I", count, *offsets, *tag_values
        )
        + body
    )


class TagTests(unittest.TestCase):
    def test_iana_values(self) -> None:
        """Table 2 of the RFC, and the byte order of section 4.1.3."""
        expected = {
            "SIG": 0x00474953,
            "VER": 0x00524556,
            "SRV": 0x00565253,
            "NONC": 0x434E4F4E,
            "DELE": 0x454C4544,
            "TYPE": 0x45505954,
            "PATH": 0x48544150,
            "RADI": 0x49444152,
            "PUBK": 0x4B425550,
            "MIDP": 0x5044494D,
            "SREP": 0x50455253,
            "VERS": 0x53524556,
            "MINT": 0x544E494D,
            "ROOT": 0x544F4F52,
            "CERT": 0x54524543,
            "MAXT": 0x5458414D,
            "INDX": 0x58444E49,
            "ZZZZ": 0x5A5A5A5A,
        }
        for name, value in expected.items():
            self.assertEqual(wire.tag(name), value, name)
            self.assertEqual(wire.tag_name(value), name)
        self.assertEqual(wire.u32(wire.NONC), b"NONC")
        self.assertEqual(wire.u32(wire.VER), b"VER\x00")

    def test_bad_names(self) -> None:
        for name in ("", "nonc", "TOOLONG", "A1"):
            self.assertRaises(ValueError, wire.tag, name)

    def test_constants(self) -> None:
        self.assertEqual(wire.MAGIC, struct.pack("<Q", 0x4D49544847554F52))
        self.assertEqual(wire.DEFAULT_PORT, 5319)
        self.assertEqual(wire.RESPONSE_CONTEXT, b"Roughtime v1 response signature\x00")
        self.assertEqual(
            wire.DELEGATION_CONTEXT, b"Roughtime v1 delegation signature\x00"
        )


class MessageTests(unittest.TestCase):
    @given(
        st.dictionaries(tags, aligned, min_size=1, max_size=12), st.binary(max_size=9)
    )
    def test_round_trip(self, pairs: dict[int, bytes], tail: bytes) -> None:
        last = max(pairs)
        pairs[last] += tail  # only the last value may be unaligned
        message = wire.encode_message(pairs)
        self.assertEqual(wire.decode_message(message), pairs)
        self.assertEqual(list(wire.decode_message(message)), sorted(pairs))

    def test_layout(self) -> None:
        message = wire.encode_message({wire.NONC: b"abcd", wire.VER: b"\x01\0\0\0"})
        self.assertEqual(
            message, struct.pack("<3I", 2, 4, wire.VER) + b"NONC" + b"\x01\0\0\0abcd"
        )

    def test_encoder_refuses_unaligned_inner_values(self) -> None:
        self.assertRaises(ValueError, wire.encode_message, {1: b"abc", 2: b""})
        self.assertRaises(ValueError, wire.encode_message, {})

    def test_zero_length_values(self) -> None:
        pairs = {1: b"", 2: b"", 3: b"xyzw"}
        self.assertEqual(wire.decode_message(wire.encode_message(pairs)), pairs)

    def test_malformed(self) -> None:
        bad = [
            b"",
            b"\x01\0\0",
            raw_message(0, [], [], b""),
            raw_message(3, [0, 0], [1, 2, 3], b"")[:-1],
            raw_message(2, [4], [2, 1], bytes(8)),  # unsorted
            raw_message(2, [4], [1, 1], bytes(8)),  # duplicate
            raw_message(2, [2], [1, 2], bytes(8)),  # offset not a multiple of 4
            raw_message(3, [8, 4], [1, 2, 3], bytes(8)),  # offsets decrease
            raw_message(2, [12], [1, 2], bytes(8)),  # offset past the end
            struct.pack("<I", 2**32 - 1) + bytes(64),  # count far too large
        ]
        for data in bad:
            self.assertRaises(wire.WireError, wire.decode_message, data)

    @given(st.binary(max_size=200))
    def test_any_bytes(self, data: bytes) -> None:
        try:
            pairs = wire.decode_message(data)
        except wire.WireError:
            return
        self.assertEqual(wire.decode_message(wire.encode_message(pairs)), pairs)


class PacketTests(unittest.TestCase):
    def test_framing(self) -> None:
        packet = wire.encode_packet(b"abcdefgh")
        self.assertEqual(packet, b"ROUGHTIM\x08\0\0\0abcdefgh")
        self.assertEqual(wire.decode_packet(packet), b"abcdefgh")

    def test_bad_frames(self) -> None:
        for data in (b"ROUGHTI", b"ROUGHTIX\0\0\0\0", b"ROUGHTIM\x09\0\0\0abcdefgh"):
            self.assertRaises(wire.WireError, wire.decode_packet, data)
        self.assertRaises(
            wire.WireError, wire.decode_packet, b"ROUGHTIM\x04\0\0\0abcdefgh"
        )


def request_pairs(**changes: bytes | None) -> dict[int, bytes]:
    pairs = {
        wire.VER: wire.u32(wire.VERSION_1),
        wire.NONC: NONCE,
        wire.TYPE: wire.u32(wire.TYPE_REQUEST),
    }
    for name, value in changes.items():
        if value is None:
            del pairs[wire.tag(name)]
        else:
            pairs[wire.tag(name)] = value
    return pairs


def padded(pairs: dict[int, bytes], size: int = 1024) -> bytes:
    pairs = dict(pairs)
    pairs[wire.ZZZZ] = bytes(size - len(wire.encode_message(pairs)) - 8)
    return wire.encode_packet(wire.encode_message(pairs))


class RequestTests(unittest.TestCase):
    def test_our_requests(self) -> None:
        packet = wire.encode_request(NONCE, srv=bytes(32))
        self.assertEqual(len(packet), 1036)
        self.assertEqual(len(wire.decode_packet(packet)), wire.MIN_REQUEST_SIZE)
        request = wire.parse_request(packet)
        self.assertEqual(request.nonce, NONCE)
        self.assertEqual(request.versions, (wire.VERSION_1,))
        self.assertEqual(request.srv, bytes(32))
        self.assertEqual(request.packet, packet)

    def test_packet_of_1024_bytes_is_enough(self) -> None:
        """Some clients pad the packet, not the message, to 1024 bytes."""
        packet = padded(request_pairs(), 1024 - wire.FRAME_SIZE)
        self.assertEqual(len(packet), 1024)
        self.assertEqual(wire.parse_request(packet).nonce, NONCE)

    def test_too_small(self) -> None:
        packet = padded(request_pairs(), 1000)
        self.assertRaises(wire.RequestTooSmall, wire.parse_request, packet[:1023])
        self.assertEqual(wire.parse_request(packet, min_size=0).nonce, NONCE)

    def test_unknown_tags_ignored(self) -> None:
        pairs = request_pairs(GRSE=b"1234", ZZZY=b"")
        self.assertEqual(wire.parse_request(padded(pairs)).nonce, NONCE)

    def test_versions(self) -> None:
        versions = wire.u32(1) + wire.u32(0x8000000C) + wire.u32(0xC0000000)
        request = wire.parse_request(padded(request_pairs(VER=versions)))
        self.assertEqual(request.versions, (1, 0x8000000C, 0xC0000000))

    def test_unanswerable(self) -> None:
        cases = [
            request_pairs(VER=None),
            request_pairs(NONC=None),
            request_pairs(TYPE=None),
            request_pairs(TYPE=wire.u32(wire.TYPE_RESPONSE)),
            request_pairs(TYPE=bytes(8)),
            request_pairs(NONC=bytes(64)),
            request_pairs(VER=b""),
            request_pairs(VER=bytes(4 * 33)),
            request_pairs(SRV=bytes(16)),
        ]
        for pairs in cases:
            self.assertRaises(wire.RequestError, wire.parse_request, padded(pairs))
        self.assertRaises(wire.RequestError, wire.parse_request, bytes(1100))

    @given(st.binary(min_size=1024, max_size=1100))
    def test_any_bytes(self, data: bytes) -> None:
        try:
            wire.parse_request(data)
        except wire.RequestError:
            pass

    @given(
        st.lists(
            st.tuples(st.integers(0, 1035), st.integers(1, 255)), min_size=1, max_size=4
        )
    )
    def test_damaged_requests(self, damage: list[tuple[int, int]]) -> None:
        """Near-misses of a valid request parse or raise RequestError, never more."""
        packet = bytearray(wire.encode_request(NONCE))
        for index, flip in damage:
            packet[index] ^= flip
        try:
            wire.parse_request(bytes(packet))
        except wire.RequestError:
            pass
