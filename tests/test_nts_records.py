"""NTS-KE records and the server's negotiation, without TLS."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.nts import records as rec
from udptime.nts.cookies import CookieKeys
from udptime.nts.ke import EXPORTER_LABEL, KeSettings, export_keys, respond
from udptime.nts.keyset import KeySet
from udptime.nts.testing import memory_keys


def fake_exporter(label: bytes, length: int, context: bytes) -> bytes:
    """Deterministic stand-in for TLS keying material export."""
    return hashlib.sha512(label + context).digest()[:length]


def store() -> KeySet:
    return memory_keys(1_700_000_000.0).key_set


def ntpv4_request(
    *extra: rec.Record, aeads: tuple[int, ...] = (15,)
) -> list[rec.Record]:
    return [
        rec.next_protocol([rec.PROTOCOL_NTPV4]),
        rec.aead_algorithm(aeads),
        *extra,
        rec.end_of_message(),
    ]


class RecordTests(unittest.TestCase):
    def test_encode_layout(self) -> None:
        self.assertEqual(rec.end_of_message().encode(), b"\x80\x00\x00\x00")
        self.assertEqual(rec.next_protocol([0]).encode(), b"\x80\x01\x00\x02\x00\x00")
        self.assertEqual(
            rec.aead_algorithm([15, 30]).encode(), b"\x80\x04\x00\x04\x00\x0f\x00\x1e"
        )
        self.assertEqual(rec.new_cookie(b"abc").encode(), b"\x00\x05\x00\x03abc")
        self.assertEqual(rec.ntpv4_port(123).encode(), b"\x80\x07\x00\x02\x00\x7b")
        self.assertEqual(rec.error(1).encode(), b"\x80\x02\x00\x02\x00\x01")

    def test_round_trip(self) -> None:
        records = [
            rec.next_protocol([0, 7]),
            rec.aead_algorithm([15], critical=False),
            rec.ntpv4_server("time.example"),
            rec.Record(0x1234, b"x" * 300),
            rec.end_of_message(),
        ]
        data = rec.encode_records(records)
        parsed = rec.parse_message(data + b"trailing")
        assert parsed is not None
        self.assertEqual(parsed, (records, len(data)))

    def test_incomplete_until_end_of_message(self) -> None:
        data = rec.encode_records(ntpv4_request())
        for cut in range(len(data)):
            self.assertIsNone(rec.parse_message(data[:cut]), cut)
        self.assertIsNotNone(rec.parse_message(data))

    def test_end_of_message_rules(self) -> None:
        with self.assertRaises(rec.RecordError):
            rec.parse_message(b"\x80\x00\x00\x01x")
        with self.assertRaises(rec.RecordError):
            rec.parse_message(b"\x00\x00\x00\x00")

    def test_record_limits(self) -> None:
        with self.assertRaises(ValueError):
            rec.Record(0x8000)
        with self.assertRaises(ValueError):
            rec.Record(1, bytes(0x10000))
        with self.assertRaises(rec.RecordError):
            rec.u16_list(b"\x00")
        self.assertEqual(rec.u16_list(b"\x00\x0f\x00\x1e"), [15, 30])
        self.assertEqual(rec.Record(5).name, "New Cookie for NTPv4")
        self.assertEqual(rec.Record(99).name, "type 99")

    @given(st.binary(max_size=400))
    def test_parse_any_bytes(self, data: bytes) -> None:
        try:
            parsed = rec.parse_message(data)
        except rec.RecordError:
            return
        if parsed is not None:
            records, used = parsed
            self.assertEqual(rec.encode_records(records), data[:used])
            self.assertEqual(records[-1].type, rec.END_OF_MESSAGE)

    @given(
        st.lists(
            st.builds(
                rec.Record,
                st.integers(1, rec.MAX_TYPE),
                st.binary(max_size=64),
                st.booleans(),
            ),
            max_size=8,
        )
    )
    def test_round_trip_any(self, records: list[rec.Record]) -> None:
        message = [*records, rec.end_of_message()]
        self.assertEqual(
            rec.parse_message(rec.encode_records(message)),
            (message, len(rec.encode_records(message))),
        )

    @given(st.lists(st.binary(max_size=80), max_size=6))
    def test_respond_never_raises(self, bodies: list[bytes]) -> None:
        request = [rec.Record(i % 9, body, i % 2 == 0) for i, body in enumerate(bodies)]
        response = respond(
            [*request, rec.end_of_message()], fake_exporter, store(), KeSettings()
        )
        self.assertEqual(response[-1], rec.end_of_message())


class NegotiationTests(unittest.TestCase):
    def test_success(self) -> None:
        keys = store()
        response = respond(ntpv4_request(), fake_exporter, keys, KeSettings())
        self.assertEqual(response[0], rec.next_protocol([0]))
        self.assertEqual(response[1], rec.aead_algorithm([15]))
        cookies = [r for r in response if r.type == rec.NEW_COOKIE]
        self.assertEqual(len(cookies), 8)
        self.assertTrue(all(not r.critical for r in cookies))
        self.assertEqual(len({r.body for r in cookies}), 8)
        self.assertEqual(response[-1], rec.end_of_message())
        self.assertEqual(len(response), 11)
        expected = export_keys(fake_exporter, 15)
        for cookie in cookies:
            self.assertEqual(keys.open(cookie.body), expected)

    def test_exported_key_contexts(self) -> None:
        calls: list[tuple[bytes, int, bytes]] = []

        def exporter(label: bytes, length: int, context: bytes) -> bytes:
            calls.append((label, length, context))
            return bytes([context[-1]]) * length

        keys = export_keys(exporter, 15)
        self.assertEqual(
            calls,
            [
                (EXPORTER_LABEL, 32, b"\x00\x00\x00\x0f\x00"),
                (EXPORTER_LABEL, 32, b"\x00\x00\x00\x0f\x01"),
            ],
        )
        self.assertEqual(keys, CookieKeys(15, bytes(32), b"\x01" * 32))
        self.assertEqual(EXPORTER_LABEL, b"EXPORTER-network-time-security")

    def test_port_and_server(self) -> None:
        response = respond(
            ntpv4_request(), fake_exporter, store(), KeSettings(20123, "ntp.example")
        )
        self.assertIn(rec.ntpv4_port(20123), response)
        self.assertIn(rec.ntpv4_server("ntp.example"), response)
        plain = respond(ntpv4_request(), fake_exporter, store(), KeSettings(123))
        self.assertFalse(
            any(r.type in (rec.NTPV4_PORT, rec.NTPV4_SERVER) for r in plain)
        )

    def test_first_supported_aead(self) -> None:
        response = respond(
            ntpv4_request(aeads=(30, 99, 15)), fake_exporter, store(), KeSettings()
        )
        self.assertEqual(response[1], rec.aead_algorithm([15]))

    def test_no_common_aead(self) -> None:
        response = respond(
            ntpv4_request(aeads=(30,)), fake_exporter, store(), KeSettings()
        )
        self.assertEqual(
            response,
            [rec.next_protocol([0]), rec.aead_algorithm([]), rec.end_of_message()],
        )

    def test_no_common_protocol(self) -> None:
        request = [rec.next_protocol([0x8001]), rec.end_of_message()]
        self.assertEqual(
            respond(request, fake_exporter, store(), KeSettings()),
            [rec.next_protocol([]), rec.end_of_message()],
        )

    def assertError(self, request: list[rec.Record], code: int) -> None:
        self.assertEqual(
            respond(request, fake_exporter, store(), KeSettings()),
            [rec.error(code), rec.end_of_message()],
        )

    def test_unknown_critical_record(self) -> None:
        self.assertError(ntpv4_request(rec.Record(0x4000, b"", True)), 0)
        # Before the negotiation records, it still decides.
        self.assertError(
            [rec.Record(0x4000, b"", True), *ntpv4_request()],
            rec.ERROR_UNRECOGNIZED_CRITICAL,
        )

    def test_unknown_non_critical_record_ignored(self) -> None:
        response = respond(
            ntpv4_request(rec.Record(0x4000, b"junk")),
            fake_exporter,
            store(),
            KeSettings(),
        )
        self.assertEqual(response[0], rec.next_protocol([0]))

    def test_client_may_name_server_and_port(self) -> None:
        response = respond(
            ntpv4_request(rec.ntpv4_server("x"), rec.ntpv4_port(1)),
            fake_exporter,
            store(),
            KeSettings(),
        )
        self.assertEqual(response[0], rec.next_protocol([0]))

    def test_bad_requests(self) -> None:
        bad = rec.ERROR_BAD_REQUEST
        self.assertError([rec.end_of_message()], bad)
        self.assertError([rec.aead_algorithm([15]), rec.end_of_message()], bad)
        self.assertError([rec.next_protocol([0]), rec.end_of_message()], bad)
        self.assertError(
            [
                rec.next_protocol([0]),
                rec.next_protocol([0]),
                rec.aead_algorithm([15]),
                rec.end_of_message(),
            ],
            bad,
        )
        self.assertError(
            [
                rec.next_protocol([0]),
                rec.aead_algorithm([15]),
                rec.aead_algorithm([15]),
                rec.end_of_message(),
            ],
            bad,
        )
        self.assertError([rec.next_protocol([]), rec.end_of_message()], bad)
        self.assertError(ntpv4_request(aeads=()), bad)
        self.assertError(
            [
                rec.Record(rec.NEXT_PROTOCOL, b"\x00\x00"),
                rec.aead_algorithm([15]),
                rec.end_of_message(),
            ],
            bad,
        )
        self.assertError(
            [rec.Record(rec.NEXT_PROTOCOL, b"\x00", True), rec.end_of_message()], bad
        )
        self.assertError(ntpv4_request(rec.error(0)), bad)
        self.assertError(ntpv4_request(rec.warning(0)), bad)
        self.assertError(ntpv4_request(rec.new_cookie(b"x")), bad)
