"""The NTP core: timestamps across eras, request parsing, replies, kisses, responder."""

from __future__ import annotations

import importlib
import math
import struct
from fractions import Fraction
from types import ModuleType

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime import clockstate
from udptime.clockstate import KernelClock
from udptime.formats import EPOCH_1900_TO_1970
from udptime.ntp import (
    KISS_DENY,
    KISS_RATE,
    Request,
    ServerState,
    build_kiss,
    build_reply,
    fixed_from_ns,
    fixed_from_ns_many,
    from_ntp,
    ns_from_ntp,
    ntp_from_ns,
    parse_request,
    precision_exponent,
    refid_from_text,
    short_format,
    to_ntp,
)
from udptime.registry import Context, get_format
from udptime.responders.ntp import NtpResponder

#: 2036-02-07T06:28:16Z, where NTP era 1 begins.
ERA_1 = 2**32 - EPOCH_1900_TO_1970
#: 2104-01-01T00:00:00Z.
YEAR_2104 = 4_228_675_200
NOW = 1_700_000_000.25

STATE = ServerState(
    leap=0,
    stratum=2,
    precision=-20,
    root_delay=0.5,
    root_dispersion=1.25,
    refid=b"\xc0\x00\x02\x01",
    reference_time=NOW - 10,
)

_REPLY_FIELDS = struct.Struct("!BBbbII4s8s8s8s8s")


def request_bytes(
    version: int = 4,
    mode: int = 3,
    poll: int = 6,
    transmit: bytes = b"\x01\x02\x03\x04\x05\x06\x07\x08",
    leap: int = 0,
    tail: bytes = b"",
) -> bytes:
    return (
        struct.pack("!BBbb", leap << 6 | version << 3 | mode, 0, poll, -6)
        + bytes(36)
        + transmit
        + tail
    )


def fields(reply: bytes) -> tuple[int | bytes, ...]:
    """Reply as (li, vn, mode, stratum, poll, precision, delay, disp, refid, ref, org, rec, xmt)."""
    first, *rest = _REPLY_FIELDS.unpack(reply)
    return (first >> 6, first >> 3 & 7, first & 7, *rest)


def ntplib() -> ModuleType:
    try:
        return importlib.import_module("ntplib")
    except ImportError:
        raise unittest.SkipTest("ntplib is not installed") from None


class TimestampTests(unittest.TestCase):
    def test_boundaries(self) -> None:
        cases = {
            -EPOCH_1900_TO_1970: bytes(8),
            0: bytes.fromhex("83aa7e80 00000000"),
            ERA_1 - 1: bytes.fromhex("ffffffff 00000000"),
            ERA_1: bytes(8),
            ERA_1 + 1: bytes.fromhex("00000001 00000000"),
            YEAR_2104: (YEAR_2104 + EPOCH_1900_TO_1970 - 2**32).to_bytes(4, "big")
            + bytes(4),
        }
        for posix, raw in cases.items():
            self.assertEqual(to_ntp(posix), raw, posix)
            self.assertEqual(to_ntp(float(posix)), raw, posix)
            self.assertEqual(ntp_from_ns(posix * 10**9), raw, posix)
            self.assertEqual(from_ntp(raw, posix + 1000.5), posix)
            self.assertEqual(ns_from_ntp(raw, posix * 10**9 - 10**12), posix * 10**9)

    def test_half_second(self) -> None:
        self.assertEqual(to_ntp(0.5), bytes.fromhex("83aa7e80 80000000"))
        self.assertEqual(ntp_from_ns(500_000_000), bytes.fromhex("83aa7e80 80000000"))

    def test_zero_resolves_by_pivot(self) -> None:
        self.assertEqual(from_ntp(bytes(8), -1e9), -EPOCH_1900_TO_1970)
        self.assertEqual(from_ntp(bytes(8), 2_000_000_000.0), ERA_1)

    def test_fraction_carries_into_seconds(self) -> None:
        self.assertEqual(to_ntp(math.nextafter(1.0, 0.0)), to_ntp(1))

    def test_not_finite(self) -> None:
        self.assertRaises((ValueError, OverflowError), to_ntp, math.nan)
        self.assertRaises((ValueError, OverflowError), to_ntp, math.inf)

    @given(
        st.integers(-EPOCH_1900_TO_1970 - 2**33, 2**35),
        st.integers(-(2**31) + 1, 2**31 - 1),
    )
    def test_whole_seconds_round_trip(self, posix: int, skew: int) -> None:
        self.assertEqual(from_ntp(to_ntp(posix), posix + skew), posix)

    @given(
        st.floats(-3e9, 6e9, allow_nan=False, allow_infinity=False),
        st.floats(-2e9, 2e9),
    )
    def test_float_round_trip(self, posix: float, skew: float) -> None:
        back = from_ntp(to_ntp(posix), posix + skew)
        self.assertLessEqual(abs(back - posix), 2**-33 + abs(posix) * 2**-52)

    @given(
        st.integers(-(10**19), 10**19),
        st.integers(-(2**31) * 10**9 + 10**9, 2**31 * 10**9 - 10**9),
    )
    def test_ns_round_trip(self, ns: int, skew: int) -> None:
        self.assertEqual(ns_from_ntp(ntp_from_ns(ns), ns + skew), ns)

    @given(st.integers(-(10**19), 10**19))
    def test_ns_rounds_to_nearest_half_up(self, ns: int) -> None:
        exact = Fraction(ns + EPOCH_1900_TO_1970 * 10**9, 10**9) * 2**32
        expected = math.floor(exact + Fraction(1, 2)) % 2**64
        self.assertEqual(int.from_bytes(ntp_from_ns(ns), "big"), expected)

    @given(st.floats(-3e9, 6e9))
    def test_float_rounds_to_nearest_half_up(self, posix: float) -> None:
        exact = (Fraction(posix) + EPOCH_1900_TO_1970) * 2**32
        expected = math.floor(exact + Fraction(1, 2)) % 2**64
        self.assertEqual(int.from_bytes(to_ntp(posix), "big"), expected)

    @given(st.integers(-(2**40), 2**40))
    def test_whole_seconds_agree(self, posix: int) -> None:
        self.assertEqual(ntp_from_ns(posix * 10**9), to_ntp(posix))

    def test_short_format(self) -> None:
        self.assertEqual(short_format(1.5), 0x0001_8000)
        self.assertEqual(short_format(-1.0), 0)
        self.assertEqual(short_format(1e9), 0xFFFF_FFFF)

    def test_precision_exponent(self) -> None:
        self.assertEqual(precision_exponent(1e-9), -29)
        self.assertEqual(precision_exponent(2**-20), -20)
        self.assertEqual(precision_exponent(1.5 * 2**-20), -19)
        self.assertEqual(precision_exponent(1.0), 0)
        self.assertRaises(ValueError, precision_exponent, 0.0)

    def test_refid_from_text(self) -> None:
        self.assertEqual(refid_from_text("192.0.2.1"), b"\xc0\x00\x02\x01")
        self.assertEqual(refid_from_text("GPS"), b"GPS\0")
        self.assertRaises(ValueError, refid_from_text, "TOOLONG")
        self.assertRaises(ValueError, refid_from_text, "")


class ParseRequestTests(unittest.TestCase):
    def test_client_request(self) -> None:
        transmit = bytes(range(8))
        self.assertEqual(
            parse_request(request_bytes(poll=-3, transmit=transmit)),
            Request(version=4, poll=-3, transmit=transmit),
        )

    def test_versions_1_to_4(self) -> None:
        for version in range(8):
            request = parse_request(request_bytes(version=version))
            if 1 <= version <= 4:
                assert request is not None
                self.assertEqual(request.version, version)
            else:
                self.assertIsNone(request, version)

    def test_only_client_mode(self) -> None:
        for mode in range(8):
            request = parse_request(request_bytes(mode=mode))
            self.assertEqual(request is not None, mode == 3, mode)

    def test_ntpv1_without_mode_is_a_client_request(self) -> None:
        """NTPv1 had no mode field: chronyd and ntpd answer mode 0 as a client."""
        request = parse_request(request_bytes(version=1, mode=0))
        assert request is not None
        self.assertEqual(request.version, 1)
        for version in (2, 3, 4):
            self.assertIsNone(parse_request(request_bytes(version=version, mode=0)))

    def test_ntpv1_reply_is_server_mode_version_1(self) -> None:
        responder = NtpResponder(lambda: STATE, lambda: NOW_NS)
        reply = responder.answer(request_bytes(version=1, mode=0), NOW_NS)
        assert reply is not None
        self.assertEqual(fields(reply)[1:3], (1, 4))

    def test_short(self) -> None:
        self.assertIsNone(parse_request(request_bytes()[:47]))
        self.assertIsNone(parse_request(b""))

    def test_extensions_ignored(self) -> None:
        plain = request_bytes()
        self.assertEqual(
            parse_request(plain + bytes(20) + b"MAC" * 8), parse_request(plain)
        )

    @given(st.binary(max_size=2048))
    def test_fuzz(self, data: bytes) -> None:
        request = parse_request(data)
        if request is not None:
            self.assertGreaterEqual(len(data), 48)
            self.assertIn(request.version, (1, 2, 3, 4))
            self.assertEqual(request.transmit, data[40:48])
            self.assertTrue(-128 <= request.poll <= 127)


class BuildReplyTests(unittest.TestCase):
    receive = to_ntp(NOW)
    transmit = to_ntp(NOW + 0.001)

    def reply(self, data: bytes, state: ServerState = STATE, **kwargs: int) -> bytes:
        request = parse_request(data)
        assert request is not None
        return build_reply(request, state, self.receive, self.transmit, **kwargs)

    def test_fields(self) -> None:
        origin = bytes.fromhex("e9f0a1b2 c3d4e5f6")
        reply = self.reply(request_bytes(version=3, poll=10, transmit=origin))
        self.assertEqual(len(reply), 48)
        self.assertEqual(
            fields(reply),
            (
                0,
                3,
                4,
                2,
                10,
                -20,
                0x0000_8000,
                0x0001_4000,
                b"\xc0\x00\x02\x01",
                to_ntp(NOW - 10),
                origin,
                self.receive,
                self.transmit,
            ),
        )

    def test_version_echoed(self) -> None:
        for version in (1, 2, 3, 4):
            self.assertEqual(
                fields(self.reply(request_bytes(version=version)))[1], version
            )

    def test_leap_from_state(self) -> None:
        for leap in range(4):
            state = ServerState(leap, 2, -20, 0.0, 0.0, b"KERN", None)
            self.assertEqual(fields(self.reply(request_bytes(), state))[0], leap)

    def test_unset_reference_time_is_zero(self) -> None:
        state = ServerState(3, 16, -20, 0.0, 16.0, b"INIT", None)
        self.assertEqual(fields(self.reply(request_bytes(), state))[9], bytes(8))

    @given(st.binary(min_size=8, max_size=8))
    def test_origin_bit_exact(self, origin: bytes) -> None:
        self.assertEqual(self.reply(request_bytes(transmit=origin))[24:32], origin)

    def test_zero_transmit_gives_zero_origin(self) -> None:
        self.assertEqual(self.reply(request_bytes(transmit=bytes(8)))[24:32], bytes(8))

    @given(st.integers(-128, 127), st.integers(4, 17))
    def test_poll_clamped(self, poll: int, min_poll: int) -> None:
        got = fields(self.reply(request_bytes(poll=poll), min_poll=min_poll))[4]
        self.assertEqual(got, min(max(poll, min_poll), 17))

    def test_ntplib_reads_it(self) -> None:
        lib = ntplib()
        stats = lib.NTPStats()
        stats.from_data(self.reply(request_bytes(version=4, poll=6)))
        self.assertEqual((stats.leap, stats.version, stats.mode), (0, 4, 4))
        self.assertEqual((stats.stratum, stats.poll, stats.precision), (2, 6, -20))
        self.assertEqual(stats.root_delay, 0.5)
        self.assertEqual(stats.root_dispersion, 1.25)
        self.assertEqual(lib.ref_id_to_text(stats.ref_id, stats.stratum), "192.0.2.1")
        self.assertAlmostEqual(
            lib.ntp_to_system_time(stats.recv_timestamp), NOW, places=6
        )
        self.assertAlmostEqual(stats.tx_time, NOW + 0.001, places=6)

    def test_state_validated(self) -> None:
        self.assertRaises(ValueError, ServerState, 4, 2, -20, 0.0, 0.0, b"KERN", None)
        self.assertRaises(ValueError, ServerState, 0, 256, -20, 0.0, 0.0, b"KERN", None)
        self.assertRaises(ValueError, ServerState, 0, 2, -129, 0.0, 0.0, b"KERN", None)
        self.assertRaises(ValueError, ServerState, 0, 2, -20, 0.0, 0.0, b"KER", None)
        self.assertRaises(
            ValueError, ServerState, 0, 2, -20, math.inf, 0.0, b"KERN", None
        )
        self.assertRaises(
            ValueError, ServerState, 0, 2, -20, 0.0, math.nan, b"KERN", None
        )
        self.assertRaises(
            ValueError, ServerState, 0, 2, -20, 0.0, 0.0, b"KERN", math.inf
        )


class KissTests(unittest.TestCase):
    origin = bytes.fromhex("e9f0a1b2 c3d4e5f6")

    def kiss(
        self,
        code: bytes,
        min_poll: int = 4,
        receive_ts: bytes | None = None,
        transmit_ts: bytes | None = None,
    ) -> tuple[int | bytes, ...]:
        request = parse_request(request_bytes(version=3, poll=5, transmit=self.origin))
        assert request is not None
        reply = build_kiss(
            request,
            code,
            min_poll=min_poll,
            receive_ts=receive_ts,
            transmit_ts=transmit_ts,
        )
        self.assertEqual(len(reply), 48)
        return fields(reply)

    def test_rate_and_deny(self) -> None:
        for code in (KISS_RATE, KISS_DENY):
            li, vn, mode, stratum, poll, _, _, _, refid, ref, org, rec, xmt = self.kiss(
                code
            )
            self.assertEqual(
                (li, vn, mode, stratum, poll, refid), (3, 3, 4, 0, 5, code)
            )
            self.assertEqual(ref, bytes(8))
            self.assertEqual((org, rec, xmt), (self.origin,) * 3)

    def test_raised_poll_and_stamps(self) -> None:
        got = self.kiss(
            KISS_RATE, min_poll=10, receive_ts=to_ntp(NOW), transmit_ts=to_ntp(NOW + 1)
        )
        self.assertEqual(got[4], 10)
        self.assertEqual(got[10:], (self.origin, to_ntp(NOW), to_ntp(NOW + 1)))

    def test_ntplib_reads_it(self) -> None:
        stats = ntplib().NTPStats()
        request = parse_request(request_bytes())
        assert request is not None
        stats.from_data(build_kiss(request, KISS_DENY))
        self.assertEqual((stats.leap, stats.stratum), (3, 0))
        self.assertEqual(stats.ref_id.to_bytes(4, "big"), KISS_DENY)

    def test_bad_code(self) -> None:
        request = Request(4, 6, bytes(8))
        self.assertRaises(ValueError, build_kiss, request, b"RAT")
        self.assertRaises(ValueError, build_kiss, request, b"\xffATE")


NOW_NS = 1_700_000_000_250_000_000


class FakeClock:
    """A wall clock (POSIX nanoseconds) that logs its reads into a shared journal."""

    def __init__(self, journal: list[str], now: int = NOW_NS + 1_000_000) -> None:
        self.journal = journal
        self.now = now

    def __call__(self) -> int:
        self.journal.append("clock")
        return self.now


class ResponderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.journal: list[str] = []
        self.state = STATE
        self.clock = FakeClock(self.journal)
        self.responder = NtpResponder(self.provide, self.clock)
        self.journal.clear()

    def provide(self) -> ServerState:
        self.journal.append("state")
        return self.state

    def expected(self, data: bytes, receive: bytes) -> bytes:
        request = parse_request(data)
        assert request is not None
        return build_reply(request, self.state, receive, ntp_from_ns(self.clock.now))

    def test_registered(self) -> None:
        fmt = get_format("ntp")
        self.assertTrue(fmt.receive_timestamps)
        responder = fmt.make_responder(Context(self.clock, self.provide))
        self.assertFalse(responder.echoes_anything)
        self.assertTrue(responder.late_stamp)
        data = request_bytes()
        self.assertEqual(
            responder.answer(data, NOW_NS), self.expected(data, ntp_from_ns(NOW_NS))
        )

    def test_transmit_read_last(self) -> None:
        reply = self.responder.answer(request_bytes(), NOW_NS)
        assert reply is not None
        self.assertEqual(self.journal, ["state", "clock"])
        self.assertEqual(reply[32:40], ntp_from_ns(NOW_NS))
        self.assertEqual(reply[40:48], ntp_from_ns(self.clock.now))

    def test_ignored_reads_no_clock(self) -> None:
        self.assertIsNone(self.responder.answer(request_bytes(mode=4), NOW_NS))
        self.assertIsNone(self.responder.answer(b"x" * 47, NOW_NS))
        self.assertNotIn("clock", self.journal)

    def test_state_change(self) -> None:
        data = request_bytes()
        self.responder.answer(data, NOW_NS)
        expected = self.expected
        self.state = ServerState(1, 3, -10, 0.0, 0.1, b"LOCL", NOW)
        got = self.responder.answer(data, NOW_NS)
        self.assertEqual(got, expected(data, ntp_from_ns(NOW_NS)))
        self.state = ServerState(1, 3, -10, 0.0, 0.1, b"LOCL", NOW)  # equal, not same
        got = self.responder.answer(data, NOW_NS)
        self.assertEqual(got, expected(data, ntp_from_ns(NOW_NS)))

    def test_bad_min_poll(self) -> None:
        self.assertRaises(
            ValueError, NtpResponder, self.provide, self.clock, min_poll=3
        )
        self.assertRaises(
            ValueError, NtpResponder, self.provide, self.clock, min_poll=18
        )

    def test_stamp_is_the_wall_clock(self) -> None:
        self.assertEqual(self.responder.stamp(), ntp_from_ns(self.clock.now))

    def test_refusals_are_kisses(self) -> None:
        data = request_bytes()
        kiss = self.responder.refuse(data, KISS_RATE)
        assert kiss is not None
        self.assertEqual((fields(kiss)[3], fields(kiss)[8]), (0, b"RATE"))
        self.assertIsNone(self.responder.refuse(b"junk", KISS_DENY))

    @given(st.binary(max_size=2048))
    def test_fuzz_matches_reference(self, data: bytes) -> None:
        reply = self.responder.answer(data, NOW_NS)
        request = parse_request(data)
        if request is None:
            self.assertIsNone(reply)
        else:
            self.assertEqual(reply, self.expected(data, ntp_from_ns(NOW_NS)))

    @given(
        st.binary(min_size=48, max_size=64), st.integers(0, 255), st.integers(0, 255)
    )
    def test_fuzz_headers(self, data: bytes, first: int, poll: int) -> None:
        data = bytes((first, data[1], poll)) + data[3:]
        reply = self.responder.answer(data, NOW_NS)
        self.assertEqual(reply is None, parse_request(data) is None)
        if reply is not None:
            self.assertEqual(reply, self.expected(data, ntp_from_ns(NOW_NS)))


class ClockStateResponderTests(unittest.TestCase):
    """The responder fed by the kernel's clock state, the reader replaced."""

    def setUp(self) -> None:
        self.kernel: KernelClock | None = None

    def reply(
        self,
        stratum: int = 2,
        local_stratum: int | None = None,
        refid: bytes = clockstate.DEFAULT_REFID,
    ) -> tuple[int | bytes, ...]:
        state = clockstate.ClockStateCache(
            lambda: NOW,
            lambda: self.kernel,
            stratum=stratum,
            local_stratum=local_stratum,
            refid=refid,
        )
        responder = NtpResponder(state, lambda: NOW_NS)
        reply = responder.answer(request_bytes(), NOW_NS)
        assert reply is not None
        return fields(reply)

    def test_unsynchronised(self) -> None:
        got = self.reply()
        self.assertEqual((got[0], got[3], got[8]), (3, 16, b"INIT"))

    def test_local_stratum(self) -> None:
        got = self.reply(local_stratum=7)
        self.assertEqual((got[0], got[3], got[8]), (0, 7, b"LOCL"))

    def test_synchronised(self) -> None:
        self.kernel = KernelClock(clockstate.TIME_OK, 0, 2000, 100)
        got = self.reply(stratum=3, refid=refid_from_text("192.0.2.9"))
        self.assertEqual((got[0], got[3], got[8]), (0, 3, b"\xc0\x00\x02\x09"))
        self.assertEqual(got[9], to_ntp(NOW))
        self.assertEqual(self.reply(refid=b"GPS\0")[8], b"GPS\0")

    def test_bad_refid(self) -> None:
        # The stratum range is the configuration's to check (--stratum).
        self.assertRaises(ValueError, self.reply, refid=b"ABCDE")


class BatchResponderTests(unittest.TestCase):
    """A batch: the same replies, transmit left for the sender's late stamp."""

    @given(
        st.lists(
            st.tuples(st.binary(min_size=0, max_size=120), st.integers(0, 2**63)),
            max_size=70,
        )
    )
    def test_matches_plain_responder_but_transmit(
        self, batch: list[tuple[bytes, int]]
    ) -> None:
        local = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", NOW)
        responder = NtpResponder(lambda: local, lambda: NOW_NS)
        replies, complete = responder.answer_batch(
            [r for r, _ in batch], [t for _, t in batch]
        )
        self.assertEqual(list(complete), [])
        for (request, moment), batched in zip(batch, replies, strict=True):
            plain = responder.answer(request, moment)
            if plain is None:
                self.assertIsNone(batched)
            else:
                assert batched is not None
                self.assertEqual(batched[:40], plain[:40])
                self.assertEqual(batched[40:], bytes(8))


class ManyStampsTests(unittest.TestCase):
    @given(st.lists(st.integers(-(2**66), 2**66), max_size=70))
    def test_same_as_one_at_a_time(self, stamps: list[int]) -> None:
        self.assertEqual(
            fixed_from_ns_many(stamps), [fixed_from_ns(ns) for ns in stamps]
        )
