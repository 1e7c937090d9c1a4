"""The Roughtime responder: batches, radius, delegation window, and
round trips through the client's verification."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.roughtime import keys, verify, wire
from udptime.roughtime.responder import (
    BATCH_BUCKETS,
    MAX_TREE_LEAVES,
    ClockState,
    RoughtimeResponder,
    _layout,
)

NOW = 1_800_000_000
NS = 1_000_000_000
ROOT = keys.generate_key()
ROOT_PUBLIC = keys.public_bytes(ROOT)
DELEGATION = keys.delegate(ROOT, NOW - 3600, NOW + 86_400)


def responder(
    state: ClockState = (True, 50_000),
    now_ns: int = NOW * NS,
    delegation: keys.Delegation = DELEGATION,
    **options: int,
) -> RoughtimeResponder:
    return RoughtimeResponder(
        delegation, lambda: state, now_ns=lambda: now_ns, **options
    )


def request(n: int = 0, **options: object) -> bytes:
    return verify.make_request(n.to_bytes(32, "little"), **options)  # type: ignore[arg-type]


class RoundTripTests(unittest.TestCase):
    def test_one(self) -> None:
        r = responder()
        query = request(public_key=ROOT_PUBLIC)
        reply = r.answer(query, NOW * NS)
        assert reply is not None
        result = verify.verify_response(query, reply, ROOT_PUBLIC)
        self.assertEqual(result.midpoint, NOW)
        self.assertEqual(result.radius, 3)
        self.assertEqual(result.version, wire.VERSION_1)
        self.assertEqual(result.response.path, ())
        self.assertEqual(len(reply), wire.response_size(0))
        self.assertEqual(r.counters.signatures, 1)
        self.assertEqual(r.counters.answered, 1)

    def test_batch_one_tree_one_signature(self) -> None:
        for count in (2, 3, 63, 64):
            r = responder()
            queries = [request(i) for i in range(count)]
            replies, complete = r.answer_batch(queries, [NOW * NS] * count)
            self.assertEqual(list(complete), list(range(count)))
            self.assertEqual(r.counters.signatures, 1)
            self.assertEqual(
                (r.counters.batch_count, r.counters.batch_leaves), (1, count)
            )
            roots = set()
            for i, (query, reply) in enumerate(zip(queries, replies)):
                assert reply is not None
                result = verify.verify_response(query, reply, ROOT_PUBLIC)
                self.assertEqual(result.response.index, i)
                roots.add(result.response.root)
                self.assertLessEqual(len(reply), len(query))
            self.assertEqual(len(roots), 1)

    def test_replies_aligned_with_junk(self) -> None:
        r = responder()
        batch = [b"junk", request(1), bytes(1100), request(2, versions=[0x8000000C])]
        batch.append(request(3))
        replies, complete = r.answer_batch(batch, [NOW * NS] * len(batch))
        self.assertEqual(
            [x is not None for x in replies], [False, True, False, False, True]
        )
        self.assertEqual(list(complete), list(range(5)))
        for i in (1, 4):
            reply = replies[i]
            assert reply is not None
            verify.verify_response(batch[i], reply, ROOT_PUBLIC)
        c = r.counters
        self.assertEqual((c.too_small, c.malformed, c.unsupported_version), (1, 1, 1))
        self.assertEqual((c.answered, c.batch_leaves), (2, 2))

    def test_large_batches_are_split(self) -> None:
        r = responder()
        count = MAX_TREE_LEAVES + 3
        queries = [request(i) for i in range(count)]
        replies, _ = r.answer_batch(queries, [NOW * NS] * count)
        self.assertEqual(r.counters.signatures, 2)
        last = replies[-1]
        assert last is not None
        self.assertEqual(
            verify.verify_response(queries[-1], last, ROOT_PUBLIC).response.index, 2
        )

    def test_smallest_requests_get_no_larger_replies(self) -> None:
        """A 1024-byte packet (padded packet, not message) in a full tree."""
        pairs = wire.decode_message(wire.decode_packet(request()))
        del pairs[wire.ZZZZ]
        base = len(wire.encode_message(pairs)) + 8 + wire.FRAME_SIZE
        queries = []
        for i in range(MAX_TREE_LEAVES):
            pairs[wire.NONC] = i.to_bytes(32, "little")
            pairs[wire.ZZZZ] = bytes(1024 - base)
            queries.append(wire.encode_packet(wire.encode_message(pairs)))
            del pairs[wire.ZZZZ]
        self.assertEqual(len(queries[0]), 1024)
        r = responder()
        replies, _ = r.answer_batch(queries, [NOW * NS] * len(queries))
        self.assertEqual(r.counters.oversized, 0)
        for query, reply in zip(queries[:5], replies[:5]):
            assert reply is not None
            self.assertLessEqual(len(reply), len(query))
            verify.verify_response(query, reply, ROOT_PUBLIC)

    def test_srv(self) -> None:
        r = responder()
        self.assertIsNotNone(r.answer(request(public_key=ROOT_PUBLIC), NOW * NS))
        other = keys.public_bytes(keys.generate_key())
        self.assertIsNone(r.answer(request(public_key=other), NOW * NS))
        self.assertEqual(r.counters.wrong_server, 1)

    def test_interface(self) -> None:
        r = responder()
        self.assertFalse(r.late_stamp)
        self.assertFalse(r.echoes_anything)
        self.assertFalse(r.kisses)
        self.assertIsNone(r.refuse(request(), b"RATE"))
        self.assertRaises(NotImplementedError, r.stamp)

    def test_midpoint_never_before_reception(self) -> None:
        """A receive stamp later than the responder's clock wins."""
        r = responder(now_ns=NOW * NS)
        query = request()
        reply = r.answer(query, (NOW + 10) * NS)
        assert reply is not None
        self.assertEqual(
            verify.verify_response(query, reply, ROOT_PUBLIC).midpoint, NOW + 10
        )

    @settings(max_examples=50)
    @given(st.binary(max_size=1500))
    def test_never_raises(self, data: bytes) -> None:
        r = responder()
        self.assertIsNone(r.answer(data, NOW * NS))
        replies, _ = r.answer_batch([data, request()], [NOW * NS] * 2)
        self.assertIsNone(replies[0])
        self.assertIsNotNone(replies[1])


class TamperTests(unittest.TestCase):
    def test_every_byte_of_a_reply(self) -> None:
        """Changing any byte of a reply makes it fail verification."""
        r = responder()
        queries = [request(i) for i in range(3)]
        replies, _ = r.answer_batch(queries, [NOW * NS] * 3)
        query, reply = queries[2], replies[2]
        assert reply is not None
        verify.verify_response(query, reply, ROOT_PUBLIC)
        for index in range(len(reply)):
            for flip in (0x01, 0x80):
                damaged = bytearray(reply)
                damaged[index] ^= flip
                with self.assertRaises(verify.VerificationError, msg=(index, flip)):
                    verify.verify_response(query, bytes(damaged), ROOT_PUBLIC)

    def test_reply_to_another_request(self) -> None:
        r = responder()
        queries = [request(i) for i in range(2)]
        replies, _ = r.answer_batch(queries, [NOW * NS] * 2)
        reply = replies[0]
        assert reply is not None
        self.assertRaises(
            verify.VerificationError,
            verify.verify_response,
            queries[1],
            reply,
            ROOT_PUBLIC,
        )

    def test_wrong_key(self) -> None:
        query = request()
        reply = responder().answer(query, NOW * NS)
        assert reply is not None
        other = keys.public_bytes(keys.generate_key())
        with self.assertRaises(verify.VerificationError) as caught:
            verify.verify_response(query, reply, other)
        self.assertEqual(caught.exception.reason, "delegation")


class RadiusTests(unittest.TestCase):
    def answer_radius(
        self, r: RoughtimeResponder, received: int = NOW * NS
    ) -> int | None:
        query = request()
        reply = r.answer(query, received)
        if reply is None:
            return None
        return verify.verify_response(query, reply, ROOT_PUBLIC).radius

    def test_minimum(self) -> None:
        self.assertEqual(self.answer_radius(responder((True, 0))), 3)
        self.assertEqual(self.answer_radius(responder((True, 0), min_radius=1)), 1)
        self.assertRaises(ValueError, responder, min_radius=0)

    def test_maxerror_rounded_up(self) -> None:
        self.assertEqual(self.answer_radius(responder((True, 10_000_000))), 10)
        self.assertEqual(self.answer_radius(responder((True, 10_000_001))), 11)
        self.assertEqual(self.answer_radius(responder((True, 16_000_000))), 16)

    def test_rounding_of_the_midpoint_is_covered(self) -> None:
        """Signing at x.4 s claims MIDP x, 0.4 s of error added to RADI."""
        r = responder((True, 9_700_000), now_ns=NOW * NS + 400_000_000)
        self.assertEqual(self.answer_radius(r), 11)

    def test_unsynchronised(self) -> None:
        for state in ((False, 100), None):
            r = responder(state)
            self.assertIsNone(self.answer_radius(r))
            self.assertEqual(r.counters.unsynchronised, 1)
            self.assertEqual(r.counters.signatures, 0)
            self.assertEqual(self.answer_radius(responder(state, local_radius=7)), 7)
            self.assertEqual(self.answer_radius(responder(state, local_radius=1)), 3)

    @given(
        st.integers(0, 100_000_000),
        st.integers(0, NS - 1),
        st.booleans(),
    )
    def test_never_claims_less_than_the_error(
        self, maxerror: int, fraction: int, synchronised: bool
    ) -> None:
        now_ns = NOW * NS + fraction
        r = responder((synchronised, maxerror), now_ns=now_ns, local_radius=5)
        query = request()
        reply = r.answer(query, NOW * NS)
        assert reply is not None
        result = verify.verify_response(query, reply, ROOT_PUBLIC)
        error_us = maxerror if synchronised else 5_000_000
        self.assertGreaterEqual(result.radius, 3)
        self.assertGreaterEqual(
            result.radius, -(-maxerror // 1_000_000) if synchronised else 5
        )
        # The true signing time lies within MIDP +- (RADI - the clock's error).
        offset_us = abs(result.midpoint * NS - now_ns) / 1000
        self.assertGreaterEqual(result.radius * 1_000_000, error_us + offset_us)


class DelegationWindowTests(unittest.TestCase):
    def test_expired(self) -> None:
        maxt = DELEGATION.maxt
        r = responder(now_ns=(maxt + 1) * NS)
        self.assertIsNone(r.answer(request(), (maxt + 1) * NS))
        self.assertEqual(r.counters.expired, 1)
        self.assertEqual(r.counters.signatures, 0)

    def test_last_second(self) -> None:
        maxt = DELEGATION.maxt
        query = request()
        reply = responder(now_ns=maxt * NS).answer(query, maxt * NS)
        assert reply is not None
        self.assertEqual(
            verify.verify_response(query, reply, ROOT_PUBLIC).midpoint, maxt
        )

    def test_not_yet_valid(self) -> None:
        mint = DELEGATION.mint
        r = responder(now_ns=(mint - 1) * NS)
        self.assertIsNone(r.answer(request(), (mint - 1) * NS))
        self.assertEqual(r.counters.not_yet_valid, 1)


class FastPathTests(unittest.TestCase):
    """Requests whose header the responder has seen are checked by slicing;
    every outcome must be what a full parse gives."""

    def test_batch_size_histogram(self) -> None:
        r = responder()
        r.answer_batch([request(n) for n in range(3)], [NOW * NS] * 3)
        r.answer(request(9), NOW * NS)
        self.assertEqual(r.batch_sizes[BATCH_BUCKETS.index(1)], 1)
        self.assertEqual(r.batch_sizes[BATCH_BUCKETS.index(4)], 1)
        self.assertEqual(sum(r.batch_sizes), 2)

    def test_header_cached_once(self) -> None:
        r = responder()
        for n in range(5):
            self.assertIsNotNone(r.answer(request(n, public_key=ROOT_PUBLIC), NOW * NS))
        self.assertEqual(len(r._layouts), 1)

    def test_replies_as_the_wire_module_builds_them(self) -> None:
        r = responder()
        queries = [request(n) for n in range(5)]
        replies, _ = r.answer_batch(queries, [NOW * NS] * 5)
        for n, (query, reply) in enumerate(zip(queries, replies, strict=True)):
            assert reply is not None
            parsed = wire.parse_response(reply)
            self.assertEqual(parsed.index, n)
            self.assertEqual(
                reply,
                wire.encode_response(
                    signature=parsed.signature,
                    nonce=parsed.nonce,
                    path=b"".join(parsed.path),
                    srep=parsed.srep,
                    cert=DELEGATION.cert,
                    index=n,
                ),
            )
            verify.verify_response(query, reply, ROOT_PUBLIC)

    @settings(max_examples=300)
    @given(
        with_srv=st.booleans(),
        edits=st.lists(
            st.tuples(
                st.sampled_from(["header", "ver", "srv", "nonce", "type", "any"]),
                st.integers(0, 1023),
                st.integers(0, 255),
            ),
            max_size=3,
        ),
        wrong_key=st.booleans(),
    )
    def test_same_outcome_as_a_full_parse(
        self, with_srv: bool, edits: list[tuple[str, int, int]], wrong_key: bool
    ) -> None:
        key = keys.public_bytes(keys.generate_key()) if wrong_key else ROOT_PUBLIC
        warm = responder()
        self.assertIsNotNone(warm.answer(request(1, public_key=ROOT_PUBLIC), NOW * NS))
        self.assertIsNotNone(warm.answer(request(2), NOW * NS))
        query = bytearray(request(3, public_key=key if with_srv else None))
        layout = _layout(bytes(query))
        assert layout is not None
        spans = {
            "header": (0, layout.ver[0]),
            "ver": layout.ver,
            "srv": layout.srv or layout.nonce,
            "nonce": layout.nonce,
            "type": layout.kind,
            "any": (0, len(query)),
        }
        for field, offset, value in edits:
            start, end = spans[field]
            query[start + offset % (end - start)] = value
        cold = responder()
        before = dataclasses.asdict(warm.counters)
        fast = warm.answer(bytes(query), NOW * NS)
        full = cold.answer(bytes(query), NOW * NS)
        self.assertEqual(fast, full)
        after = dataclasses.asdict(warm.counters)
        changed = {k: after[k] - before[k] for k in after if after[k] != before[k]}
        self.assertEqual(
            changed,
            {k: v for k, v in dataclasses.asdict(cold.counters).items() if v},
        )

    @settings(max_examples=200)
    @given(
        with_srv=st.booleans(),
        edits=st.lists(
            st.tuples(
                st.integers(0, 3),
                st.sampled_from(["header", "ver", "srv", "nonce", "type", "any"]),
                st.integers(0, 1023),
                st.integers(0, 255),
            ),
            max_size=3,
        ),
        grow=st.tuples(st.integers(0, 3), st.sampled_from([0, 0, 4, 8])),
    )
    def test_batch_same_outcome_as_one_by_one(
        self,
        with_srv: bool,
        edits: list[tuple[int, str, int, int]],
        grow: tuple[int, int],
    ) -> None:
        """A batch whose requests share a known header is checked a column
        at a time; each request must fare as it would alone."""
        warm = responder()
        self.assertIsNotNone(warm.answer(request(1, public_key=ROOT_PUBLIC), NOW * NS))
        self.assertIsNotNone(warm.answer(request(2), NOW * NS))
        srv = ROOT_PUBLIC if with_srv else None
        batch = [bytearray(request(10 + k, public_key=srv)) for k in range(4)]
        layout = _layout(bytes(batch[0]))
        assert layout is not None
        spans = {
            "header": (0, layout.ver[0]),
            "ver": layout.ver,
            "srv": layout.srv or layout.nonce,
            "nonce": layout.nonce,
            "type": layout.kind,
            "any": (0, len(batch[0])),
        }
        for which, field, offset, value in edits:
            start, end = spans[field]
            batch[which][start + offset % (end - start)] = value
        batch[grow[0]].extend(bytes(grow[1]))  # the frame's length now lies
        queries = [bytes(q) for q in batch]
        before = dataclasses.asdict(warm.counters)
        replies, _ = warm.answer_batch(queries, [NOW * NS] * 4)
        alone = [responder() for _ in queries]
        singles = [r.answer(q, NOW * NS) for r, q in zip(alone, queries, strict=True)]
        self.assertEqual(
            [reply is None for reply in replies], [s is None for s in singles]
        )
        for query, reply in zip(queries, replies, strict=True):
            if reply is not None:
                verify.verify_response(query, reply, ROOT_PUBLIC)
        after = dataclasses.asdict(warm.counters)
        for reason in (
            "answered",
            "too_small",
            "malformed",
            "unsupported_version",
            "wrong_server",
        ):
            self.assertEqual(
                after[reason] - before[reason],
                sum(getattr(r.counters, reason) for r in alone),
                reason,
            )
