"""NTS extension fields and the NTS responder, in memory."""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace
from unittest import skipUnless

from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import FakeDatagramTransport
from twisted.trial import unittest

from udptime.core import AnsweringCore, Reply
from udptime.mmsg.libc import available as mmsg_available
from udptime.mmsg.receive import Receiver
from udptime.mmsg.send import Sender
from udptime.ntp import ServerState, fixed_from_ns, ns_from_ntp, ntp_from_ns
from udptime.nts import extensions as ext
from udptime.nts.cookies import CookieKeys, MasterKey
from udptime.nts.keyset import KeyHolder
from udptime.nts.responder import MAX_LEAD_NS, NtsResponder
from udptime.nts.testing import memory_keys
from udptime.protocol import SEAL_BUDGET_NS, TimeProtocol
from udptime.registry import Context, get_format
from udptime.responders.ntp import NtpResponder

NOW = 1_700_000_000.0
NOW_NS = 1_700_000_000_000_000_000
STATE = ServerState(0, 10, -20, 0.0, 0.001, b"LOCL", NOW - 100)
KEYS = CookieKeys(15, os.urandom(32), os.urandom(32))


def sealed(reply: Reply | None) -> bytes | None:
    """What the shell sends for *reply*: a sealer is called, as right before a send."""
    return reply() if callable(reply) else reply


def header(version: int = 4, transmit: bytes = b"") -> bytes:
    return bytes([version << 3 | 3, 0, 6]) + bytes(37) + (transmit or os.urandom(8))


class Client:
    """Just enough of an NTS client to drive the responder."""

    def __init__(self, store: KeyHolder, keys: CookieKeys = KEYS) -> None:
        self.keys = keys
        self.c2s = AESSIV(keys.c2s)
        self.s2c = AESSIV(keys.s2c)
        self.cookie = store.key_set.seal(keys, os.urandom(16))
        self.unique_id = os.urandom(32)

    def request(
        self, placeholders: int = 0, encrypted: int = 0, version: int = 4
    ) -> bytes:
        return ext.build_request(
            header(version),
            self.unique_id,
            self.cookie,
            self.c2s,
            os.urandom(16),
            placeholders=placeholders,
            encrypted_placeholders=encrypted,
        )


class FieldTests(unittest.TestCase):
    def test_encode_field_padding(self) -> None:
        self.assertEqual(ext.encode_field(0x0104, b""), b"\x01\x04\x00\x10" + bytes(12))
        self.assertEqual(len(ext.encode_field(1, b"x" * 13)), 20)
        self.assertEqual(len(ext.encode_field(1, b"x" * 32)), 36)
        self.assertEqual(len(ext.encode_field(1, b"x", ext.MIN_LAST_EF_LENGTH)), 28)
        with self.assertRaises(ValueError):
            ext.encode_field(1, bytes(0xFFFF))

    def test_parse_fields(self) -> None:
        packet = (
            header()
            + ext.encode_field(0x0104, b"a" * 32)
            + ext.encode_field(9, b"z", ext.MIN_LAST_EF_LENGTH)
        )
        fields, end = ext.parse_fields(packet)
        self.assertEqual(end, len(packet))
        self.assertEqual(
            [(f.type, f.offset, f.length) for f in fields],
            [(0x0104, 48, 36), (9, 84, 28)],
        )
        self.assertEqual(fields[0].body, b"a" * 32)
        # A legacy MAC (<= 24 bytes) after the fields is left alone.
        fields, end = ext.parse_fields(packet + bytes(20))
        self.assertEqual((len(fields), end), (2, len(packet)))

    def test_parse_fields_errors(self) -> None:
        for bad in (
            b"\x01\x04\x00\x0c" + bytes(32),  # shorter than 16
            b"\x01\x04\x00\x11" + bytes(32),  # not a multiple of 4
            b"\x01\x04\x00\x40" + bytes(32),  # past the end
        ):
            with self.assertRaises(ext.ExtensionError):
                ext.parse_fields(header() + bad)
        with self.assertRaises(ext.ExtensionError):
            ext.parse_fields(b"\x00\x01\x00\x08abcd\x00", 0, min_length=4)

    @given(st.binary(max_size=300))
    def test_parse_fields_any_bytes(self, tail: bytes) -> None:
        packet = header() + tail
        try:
            fields, end = ext.parse_fields(packet)
        except ext.ExtensionError:
            return
        self.assertLessEqual(end, len(packet))
        self.assertEqual(sum(f.length for f in fields), end - 48)

    @given(st.binary(max_size=300))
    def test_parse_nts_request_any_bytes(self, tail: bytes) -> None:
        try:
            ext.parse_nts_request(header() + tail)
        except ext.ExtensionError:
            pass

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(ext.NTS_TYPES) + [7]), st.binary(max_size=120)
            ),
            max_size=6,
        )
    )
    def test_parse_nts_request_any_fields(
        self, fields: list[tuple[int, bytes]]
    ) -> None:
        packet = header() + b"".join(ext.encode_field(t, b) for t, b in fields)
        try:
            parsed = ext.parse_nts_request(packet)
        except ext.ExtensionError:
            return
        if parsed is not None:
            self.assertGreaterEqual(len(parsed.unique_id), 32)

    @given(st.binary(max_size=200), st.integers(0, 200))
    def test_encrypted_placeholders_any_bytes(self, data: bytes, length: int) -> None:
        try:
            self.assertGreaterEqual(ext.encrypted_placeholders(data, length), 0)
        except ext.ExtensionError:
            pass

    def test_authenticator_round_trip(self) -> None:
        siv = AESSIV(os.urandom(32))
        associated = header() + ext.encode_field(0x0104, os.urandom(32))
        nonce = os.urandom(16)
        field = ext.encode_authenticator(siv, associated, b"secret-efs", nonce)
        packet = associated + field
        fields, _ = ext.parse_fields(packet)
        auth = ext.parse_authenticator(fields[-1])
        self.assertEqual(auth.offset, len(associated))
        self.assertEqual(auth.nonce, nonce)
        self.assertEqual(ext.open_authenticator(siv, packet, auth), b"secret-efs")
        self.assertEqual(len(field), ext.authenticator_length(16, len(b"secret-efs")))
        # Any change to the associated data, nonce or ciphertext fails (the
        # last 2 bytes pad the ciphertext: padding is not authenticated).
        for i in range(len(packet) - 2):
            if 48 + 36 + 4 <= i < 48 + 36 + 8:
                continue  # the length words: changing them breaks parsing instead
            forged = bytearray(packet)
            forged[i] ^= 0x40
            try:
                forged_auth = ext.parse_authenticator(
                    ext.parse_fields(bytes(forged))[0][-1]
                )
            except ext.ExtensionError:
                continue
            self.assertIsNone(
                ext.open_authenticator(siv, bytes(forged), forged_auth), i
            )

    def test_empty_plaintext_and_short_nonce(self) -> None:
        siv = AESSIV(os.urandom(32))
        field = ext.encode_authenticator(siv, b"ad", b"", b"n")
        self.assertEqual(len(field), 4 + 4 + 16 + 16)
        auth = ext.parse_authenticator(ext.parse_fields(field, 0)[0][0])
        self.assertEqual(auth.nonce, b"n")
        self.assertEqual(siv.decrypt(auth.ciphertext, [b"ad", b"n"]), b"")

    def test_authenticator_length_checks(self) -> None:
        def field(body: bytes) -> ext.ExtensionField:
            return ext.ExtensionField(ext.AUTHENTICATOR, 48, len(body) + 4, body)

        for body in (
            b"\x00",
            struct.pack("!HH", 0, 16) + bytes(32),
            struct.pack("!HH", 16, 15) + bytes(32),
            struct.pack("!HH", 16, 16) + bytes(31),
            struct.pack("!HH", 4, 16) + bytes(20),  # nonce not padded up to 16
        ):
            with self.assertRaises(ext.ExtensionError):
                ext.parse_authenticator(field(body))


class RequestParseTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = memory_keys(NOW)
        self.client = Client(self.store)

    def test_parse_request(self) -> None:
        request = self.client.request(placeholders=2)
        parsed = ext.parse_nts_request(request)
        assert parsed is not None
        self.assertEqual(parsed.unique_id, self.client.unique_id)
        self.assertEqual(parsed.cookie, self.client.cookie)
        self.assertEqual(parsed.placeholders, 2)

    def test_plain_requests(self) -> None:
        self.assertIsNone(ext.parse_nts_request(header()))
        self.assertIsNone(
            ext.parse_nts_request(header() + ext.encode_field(0x2005, b"x"))
        )
        # Garbage that is not an NTS field is not an NTS request either.
        self.assertIsNone(ext.parse_nts_request(header() + bytes(20) + b"\x01" * 28))

    def test_malformed_nts(self) -> None:
        uid = ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        cookie = ext.encode_field(ext.NTS_COOKIE, self.client.cookie)
        auth = ext.encode_authenticator(AESSIV(KEYS.c2s), b"", b"", os.urandom(16))
        bad = [
            uid + cookie,  # no authenticator
            cookie + auth,  # no unique id
            uid + auth,  # no cookie
            uid + uid + cookie + auth,
            uid + cookie + cookie + auth,
            uid + cookie + auth + ext.encode_field(ext.COOKIE_PLACEHOLDER, bytes(104)),
            uid + cookie + auth + auth,
            uid + cookie + auth + bytes(8),  # a "MAC" after the authenticator
            ext.encode_field(ext.UNIQUE_IDENTIFIER, bytes(16)) + cookie + auth,
            uid + cookie + ext.encode_field(ext.COOKIE_PLACEHOLDER, bytes(100)) + auth,
            uid + b"\x02\x04\x00\x09" + bytes(40),
        ]
        for tail in bad:
            with self.assertRaises(ext.ExtensionError, msg=tail[:8]):
                ext.parse_nts_request(header() + tail)


class ResponderTests(unittest.TestCase):
    def setUp(self) -> None:
        self.now = NOW
        self.store = memory_keys(self.now)
        self.ntp = NtpResponder(lambda: STATE, self.clock_ns)
        self.responder = NtsResponder(self.ntp, self.store)
        self.client = Client(self.store)

    def clock_ns(self) -> int:
        return round((self.now + 0.001) * 1e9)

    def reply(self, request: bytes) -> bytes:
        reply = sealed(self.responder.answer(request, NOW_NS))
        assert reply is not None
        return reply

    def test_authenticated_reply(self) -> None:
        request = self.client.request()
        reply = self.reply(request)
        self.assertEqual(len(reply), len(request))
        opened = ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertFalse(opened.nak)
        self.assertEqual(len(opened.cookies), 1)
        self.assertEqual(self.store.key_set.open(opened.cookies[0]), KEYS)
        self.assertNotEqual(opened.cookies[0], self.client.cookie)
        # The header is the plain NTP reply's.
        plain = self.ntp.answer(request[:48], NOW_NS)
        assert plain is not None
        self.assertEqual(reply[:48], plain)
        self.assertEqual(reply[24:32], request[40:48])
        self.assertEqual(self.responder.counters.authenticated, 1)

    def test_batch_responder(self) -> None:
        self.assertTrue(self.responder.late_stamp)
        request = self.client.request()
        plain = header()
        forged = bytearray(request)
        forged[-1] ^= 1
        batch = [request, plain, bytes(forged), request + bytes(16)]
        replies, complete = self.responder.answer_batch(batch, [NOW_NS] * 4)
        self.assertEqual(sorted(complete), [0, 2])
        # The NTS reply is a sealer: stamped when the shell calls it.
        self.assertTrue(callable(replies[0]))
        self.now += 0.5
        reply = sealed(replies[0])
        assert reply is not None
        ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertEqual(reply[40:48], ntp_from_ns(self.clock_ns()))  # stamped, sealed
        self.assertEqual(reply[32:40], ntp_from_ns(NOW_NS))
        expected, _ = self.ntp.answer_batch([plain], [NOW_NS])
        self.assertEqual(replies[1], expected[0])
        nak = replies[2]
        assert isinstance(nak, bytes)
        self.assertEqual(nak[12:16], b"NTSN")
        self.assertIsNone(replies[3])

    def test_stamp_moved_ahead_by_what_signing_took(self) -> None:
        # Each read of the performance clock 8 us after the last: every
        # sealing takes 8 us; a quarter of the difference is taken each time.
        ticks = itertools.count(0, 8_000)
        responder = NtsResponder(self.ntp, self.store, perf_ns=lambda: next(ticks))
        stamps = []
        for _ in range(3):
            reply = sealed(responder.answer(self.client.request(), NOW_NS))
            assert reply is not None
            ext.open_response(reply, self.client.s2c, self.client.unique_id)
            stamps.append(int.from_bytes(reply[40:48], "big"))
        now = fixed_from_ns(self.clock_ns())
        ahead = [round((stamp - now) * 1e9 / 2**32) for stamp in stamps]
        self.assertEqual(ahead, [0, 2_000, 3_500])

    def test_stamp_never_moved_far_ahead(self) -> None:
        ticks = itertools.count(0, 10**9)  # every sealing "took" a second
        responder = NtsResponder(self.ntp, self.store, perf_ns=lambda: next(ticks))
        replies = [
            sealed(responder.answer(self.client.request(), NOW_NS)) for _ in range(40)
        ]
        last = replies[-1]
        assert last is not None
        ahead = int.from_bytes(last[40:48], "big") - fixed_from_ns(self.clock_ns())
        self.assertLessEqual(ahead * 1e9 / 2**32, MAX_LEAD_NS)
        self.assertGreater(ahead * 1e9 / 2**32, MAX_LEAD_NS * 0.99)

    def test_refusals_to_nts_requests_are_authenticated_kisses(self) -> None:
        for code in (b"RATE", b"DENY"):
            request = self.client.request()
            kiss = self.responder.refuse(request, code)
            assert kiss is not None
            self.assertEqual((kiss[1], kiss[12:16]), (0, code))
            self.assertEqual(kiss[0] >> 6, 3)
            self.assertLessEqual(len(kiss), len(request))
            opened = ext.open_response(kiss, self.client.s2c, self.client.unique_id)
            self.assertFalse(opened.nak)
            self.assertEqual(len(opened.cookies), 1)  # the spent cookie replaced
            self.assertEqual(self.store.open(opened.cookies[0]), KEYS)

    def test_refusal_with_a_bad_cookie_still_echoes_the_identifier(self) -> None:
        request = bytearray(self.client.request())
        request[-20] ^= 1
        kiss = self.responder.refuse(bytes(request), b"RATE")
        assert kiss is not None
        self.assertEqual(kiss[12:16], b"RATE")
        fields, _ = ext.parse_fields(kiss)
        self.assertEqual([f.type for f in fields], [ext.UNIQUE_IDENTIFIER])
        self.assertEqual(fields[0].body, self.client.unique_id)
        self.assertEqual(self.responder.counters.naks, 0)

    def test_refusal_to_plain_ntp_is_a_plain_kiss(self) -> None:
        kiss = self.responder.refuse(header(), b"RATE")
        assert kiss is not None
        self.assertEqual((len(kiss), kiss[12:16]), (48, b"RATE"))

    def test_placeholders_get_cookies(self) -> None:
        for placeholders, encrypted, expected in (
            (3, 0, 4),
            (0, 2, 3),
            (2, 2, 5),
            (9, 0, 8),
        ):
            request = self.client.request(placeholders, encrypted)
            reply = self.reply(request)
            cookies = ext.open_response(
                reply, self.client.s2c, self.client.unique_id
            ).cookies
            self.assertEqual(len(cookies), expected, (placeholders, encrypted))
            self.assertLessEqual(len(reply), len(request))
            if not encrypted and placeholders <= 7:
                self.assertEqual(len(reply), len(request))

    def test_reply_never_larger_than_request(self) -> None:
        # Encrypted placeholders ask for cookies without paying for the space
        # in the clear; the reply still fits in the request.
        request = self.client.request(0, 5)
        reply = self.reply(request)
        self.assertLessEqual(len(reply), len(request))
        cookies = ext.open_response(
            reply, self.client.s2c, self.client.unique_id
        ).cookies
        self.assertEqual(len(cookies), 6)

    def test_tampered_authenticator_nak(self) -> None:
        request = bytearray(self.client.request())
        request[-20] ^= 1
        reply = self.reply(bytes(request))
        self.assertNak(reply, bytes(request))

    def test_tampered_header_nak(self) -> None:
        request = bytearray(self.client.request())
        request[40] ^= 1  # the transmit stamp is associated data
        self.assertNak(self.reply(bytes(request)), bytes(request))

    def test_unknown_key_nak(self) -> None:
        other = MasterKey(0x01020304, os.urandom(64), NOW)
        self.client.cookie = other.seal(KEYS, os.urandom(16))
        request = self.client.request()
        self.assertNak(self.reply(request), request)
        self.assertEqual(self.responder.counters.naks, 1)

    def test_cookie_under_an_accepted_key_opens(self) -> None:
        # Keys a second fleet secret derives only open (KeySet.accepted).
        other = MasterKey(0x0A0B0C0D, os.urandom(64), NOW)
        self.client.cookie = other.seal(KEYS, os.urandom(16))
        request = self.client.request()
        self.assertNak(self.reply(request), request)
        self.store.key_set = replace(self.store.key_set, accepted=(other,))
        reply = self.reply(self.client.request())
        opened = ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertFalse(opened.nak)
        # New cookies are sealed under the current key, not the accepted one.
        self.assertEqual(self.store.key_set.current.open(opened.cookies[0]), KEYS)

    def test_expired_key_nak(self) -> None:
        request = self.client.request()
        self.now += 3 * 86_400
        # What the keys file's owner swaps in as time goes by.
        self.store.key_set = self.store.key_set.at(self.now)
        self.assertNak(self.reply(request), request)

    def assertNak(self, reply: bytes, request: bytes) -> None:
        self.assertEqual(reply[1], 0)
        self.assertEqual(reply[12:16], b"NTSN")
        self.assertEqual(reply[0] >> 6, 3)
        self.assertEqual(reply[24:32], request[40:48])
        self.assertLessEqual(len(reply), len(request))
        opened = ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertTrue(opened.nak)
        fields, _ = ext.parse_fields(reply)
        self.assertEqual([f.type for f in fields], [ext.UNIQUE_IDENTIFIER])

    def test_plain_ntp_unchanged(self) -> None:
        for request in (
            header(),
            header(3),
            header() + bytes(20) + b"\x01" * 28,
            header() + ext.encode_field(0x2005, b"x" * 40),
            header(3) + ext.encode_field(0x2005, b"x" * 40),
        ):
            self.assertEqual(
                self.responder.answer(request, NOW_NS), self.ntp.answer(request, NOW_NS)
            )
        self.assertIsNone(self.responder.answer(b"\x1b" + bytes(10), NOW_NS))
        self.assertIsNone(
            self.responder.answer(bytes([4 << 3 | 4]) + bytes(100), NOW_NS)
        )

    def test_malformed_nts_dropped(self) -> None:
        request = self.client.request()
        self.assertIsNone(self.responder.answer(request + bytes(16), NOW_NS))
        cut = request[:48] + request[48 + 36 :]  # no unique identifier
        self.assertIsNone(self.responder.answer(cut, NOW_NS))
        self.assertEqual(self.responder.counters.malformed, 2)

    def test_malformed_plaintext_dropped(self) -> None:
        associated = header() + ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        associated += ext.encode_field(ext.NTS_COOKIE, self.client.cookie)
        request = associated + ext.encode_authenticator(
            self.client.c2s, associated, b"\x03\x04\x00\x09xxxxx", os.urandom(16)
        )
        self.assertIsNone(self.responder.answer(request, NOW_NS))

    @given(st.integers(48, 400), st.integers(0, 255))
    def test_corrupted_requests_never_raise(self, position: int, value: int) -> None:
        request = bytearray(self.client.request(placeholders=1))
        if position < len(request):
            request[position] = value
        reply = sealed(self.responder.answer(bytes(request), NOW_NS))
        if reply is not None:
            self.assertLessEqual(len(reply), len(request))

    def test_registry_wraps_ntp_when_nts_is_on(self) -> None:
        local = ServerState(0, 10, -20, 0.0, 0.01, b"LOCL", NOW)
        context = Context(self.clock_ns, lambda: local, nts_cookies=self.store)
        responder = get_format("ntp").make_responder(context)
        self.assertIsInstance(responder, NtsResponder)
        reply = sealed(responder.answer(self.client.request(), NOW_NS))
        assert reply is not None
        ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertEqual(reply[1], 10)


class ConformanceTests(unittest.TestCase):
    """RFC 8915 corner cases, with packets as clients send them."""

    def setUp(self) -> None:
        self.now = NOW
        self.store = memory_keys(self.now)
        self.ntp = NtpResponder(lambda: STATE, self.clock_ns)
        self.responder = NtsResponder(self.ntp, self.store)
        self.client = Client(self.store)

    def clock_ns(self) -> int:
        return round((self.now + 0.001) * 1e9)

    def answer(self, request: bytes) -> bytes | None:
        return sealed(self.responder.answer(request, NOW_NS))

    # Section 5.3: "This extension field MAY also be used standalone, without
    # NTS"; a server's reply to a request carrying it carries it back.

    def test_unique_identifier_alone_is_echoed(self) -> None:
        for uid in (os.urandom(32), os.urandom(33), os.urandom(64)):
            field = ext.encode_field(ext.UNIQUE_IDENTIFIER, uid)
            for others in (b"", ext.encode_field(0x2005, b"x" * 60)):
                request = header() + others + field
                reply = self.answer(request)
                assert reply is not None
                self.assertEqual(reply[48:], field)  # echoed exactly, nothing else
                self.assertLessEqual(len(reply), len(request))
                plain = self.ntp.answer(request[:48], NOW_NS)
                self.assertEqual(reply[:48], plain)
                fields, _ = ext.parse_fields(reply)
                self.assertEqual(
                    [(f.type, f.body) for f in fields],
                    [(ext.UNIQUE_IDENTIFIER, field[4:])],
                )
        self.assertEqual(self.responder.counters.echoed, 6)
        self.assertEqual(self.responder.counters.malformed, 0)

    def test_unique_identifier_alone_in_a_batch_and_in_a_kiss(self) -> None:
        field = ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        request = header() + field
        replies, complete = self.responder.answer_batch(
            [header(), request], [NOW_NS] * 2
        )
        self.assertEqual(list(complete), [1])
        self.now += 1.0  # the stamp is read when the shell seals the reply
        reply = sealed(replies[1])
        assert reply is not None
        self.assertEqual(reply[40:48], ntp_from_ns(self.clock_ns()))
        self.assertEqual(reply[48:], field)
        kiss = self.responder.refuse(request, b"RATE")
        assert kiss is not None
        self.assertEqual((kiss[12:16], kiss[48:]), (b"RATE", field))

    def test_unique_identifier_with_placeholders_only_is_malformed(self) -> None:
        field = ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        placeholder = ext.encode_field(ext.COOKIE_PLACEHOLDER, bytes(104))
        self.assertIsNone(self.answer(header() + field + placeholder))
        self.assertIsNone(self.answer(header() + field + bytes(8) + field))
        self.assertEqual(self.responder.counters.malformed, 2)

    # Section 5.7: "The server MUST discard any unauthenticated extension
    # fields and process the packet as though they were not present."

    def test_unauthenticated_field_after_the_authenticator_is_discarded(
        self,
    ) -> None:
        for extra in (
            ext.encode_field(0x2005, b"x" * 40),
            ext.encode_field(0x2005, os.urandom(12)) + ext.encode_field(9, b"y" * 30),
        ):
            request = self.client.request(placeholders=1)
            reply = self.answer(request + extra)
            assert reply is not None
            opened = ext.open_response(reply, self.client.s2c, self.client.unique_id)
            self.assertFalse(opened.nak)
            self.assertEqual(len(opened.cookies), 2)
            # As though absent: the reply is as long as the authenticated part.
            self.assertEqual(len(reply), len(request))
        self.assertEqual(self.responder.counters.malformed, 0)
        self.assertEqual(self.responder.counters.authenticated, 2)

    def test_nts_field_after_the_authenticator_is_malformed(self) -> None:
        request = self.client.request()
        for extra in (
            ext.encode_field(ext.COOKIE_PLACEHOLDER, bytes(104)),
            ext.encode_field(0x2005, b"x" * 40)
            + ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32)),
            ext.encode_field(0x2005, b"x" * 40) + bytes(20),  # and then a "MAC"
        ):
            self.assertIsNone(self.answer(request + extra))
        self.assertEqual(self.responder.counters.malformed, 3)

    # NTS (and the Unique Identifier with it) is defined for NTPv4 only.

    def test_nts_in_an_ntpv3_header_is_dropped_not_answered_plain(self) -> None:
        for version in (3, 2, 1):
            request = self.client.request(version=version)
            self.assertIsNone(self.answer(request))
            replies, complete = self.responder.answer_batch([request], [NOW_NS])
            self.assertEqual((list(replies), list(complete)), ([None], []))
            self.assertIsNone(self.responder.refuse(request, b"RATE"))
            alone = header(version) + ext.encode_field(
                ext.UNIQUE_IDENTIFIER, os.urandom(32)
            )
            self.assertIsNone(self.answer(alone))
        self.assertEqual(self.responder.counters.malformed, 12)
        self.assertEqual(self.responder.counters.authenticated, 0)
        # Without NTS fields an NTPv3 request with trailing bytes is still
        # answered as before.
        other = header(3) + ext.encode_field(0x2005, b"x" * 40)
        self.assertEqual(self.answer(other), self.ntp.answer(other, NOW_NS))

    @given(st.binary(min_size=1, max_size=200))
    def test_anything_after_the_authenticator_never_raises(self, tail: bytes) -> None:
        request = self.client.request()
        reply = sealed(self.responder.answer(request + tail, NOW_NS))
        if reply is not None:
            self.assertLessEqual(len(reply), len(request))
            ext.open_response(reply, self.client.s2c, self.client.unique_id)


class CountingClock:
    """A wall clock that moves 1 ms per read: which read stamped what shows."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> int:
        self.reads += 1
        return NOW_NS + self.reads * 1_000_000

    def read(self, stamp: bytes) -> int:
        """Which read gave the NTP timestamp *stamp*."""
        return round((ns_from_ntp(stamp, NOW_NS) - NOW_NS) / 1_000_000)


class ShellTests(unittest.TestCase):
    """The shell sends a sealer's reply right after calling it, on both paths."""

    def setUp(self) -> None:
        self.store = memory_keys(NOW)
        self.clock = CountingClock()
        self.ntp = NtpResponder(lambda: STATE, self.clock)
        self.responder = NtsResponder(self.ntp, self.store)
        self.protocol = TimeProtocol(
            "ntp", AnsweringCore(self.responder, None), Clock()
        )
        self.client = Client(self.store)

    def test_portable_path_seals_right_before_the_send(self) -> None:
        transport = FakeDatagramTransport()
        self.protocol.makeConnection(transport)
        request = self.client.request()
        self.protocol.datagramReceived(request, ("127.0.0.1", 4000))
        [(reply, addr)] = transport.written
        self.assertEqual(addr, ("127.0.0.1", 4000))
        ext.open_response(reply, self.client.s2c, self.client.unique_id)
        self.assertEqual(self.clock.read(reply[40:48]), 1)
        self.assertEqual(self.protocol.counters.answered, 1)

    def test_a_raising_sealer_costs_only_its_reply(self) -> None:
        def broken() -> bytes:
            raise RuntimeError("sealer bug")

        class BrokenSealer:
            late_stamp = echoes_anything = kisses = False

            def answer(self, request: bytes, received_ns: int) -> Reply | None:
                return broken

            def answer_batch(
                self, requests: Sequence[bytes], received_ns: Sequence[int]
            ) -> tuple[list[Reply | None], list[int]]:
                return [broken] * len(requests), list(range(len(requests)))

            def stamp(self) -> bytes:
                return bytes(8)

            def refuse(self, request: bytes, why: bytes) -> bytes | None:
                return None

        protocol = TimeProtocol("ntp", AnsweringCore(BrokenSealer(), None), Clock())
        transport = FakeDatagramTransport()
        protocol.makeConnection(transport)
        protocol.datagramReceived(header(), ("127.0.0.1", 4000))
        protocol.datagramReceived(header(), ("127.0.0.1", 4001))
        self.assertEqual(transport.written, [])
        self.assertEqual(protocol.counters.errors, 2)
        self.assertEqual(protocol.counters.answered, 0)

    @skipUnless(mmsg_available(), "no recvmmsg/sendmmsg here")
    def test_batch_path_seals_replies_after_the_others_went_out(self) -> None:
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        receiver = Receiver(server, clock_ns=lambda: NOW_NS)
        sender = Sender(receiver)
        clients = []
        kinds = ["plain", "nts", "plain", "nts", "uid", "nts", "nts", "nts"]
        uid_field = ext.encode_field(ext.UNIQUE_IDENTIFIER, os.urandom(32))
        for kind in kinds:
            client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.addCleanup(client.close)
            client.settimeout(2.0)
            if kind == "plain":
                payload = header()
            elif kind == "nts":
                payload = self.client.request()
            else:
                payload = header() + uid_field
            client.sendto(payload, server.getsockname())
            clients.append(client)
        select.select([server], [], [], 2.0)
        n = receiver.receive()
        self.assertEqual(n, len(kinds))
        self.protocol.batch_received(receiver, sender, n)
        replies = [client.recv(2048) for client in clients]
        reads = [self.clock.read(reply[40:48]) for reply in replies]
        # One read for the late stamp of the plain replies, sent together
        # first; then one per sealed reply, read as it is sealed, right
        # before its own send.
        self.assertEqual(reads, [1, 2, 1, 3, 4, 5, 6, 7])
        for kind, reply in zip(kinds, replies):
            if kind == "nts":
                ext.open_response(reply, self.client.s2c, self.client.unique_id)
            elif kind == "uid":
                self.assertEqual(reply[48:], uid_field)
            else:
                self.assertEqual(len(reply), 48)
        self.assertEqual(self.protocol.counters.answered, len(kinds))
        self.assertEqual(sender.sent_count, len(kinds))
        # A datagram the batch cannot answer is simply not sent.
        self.assertEqual(sender.send_one(0, b""), 0)
        with self.assertRaises(ValueError):
            sender.send_one(receiver.batch, b"x")


class ListReceiver:
    """What ``batch_received`` reads from a ``Receiver``, from a list."""

    def __init__(self, data: list[bytes], batch: int) -> None:
        self.items = data
        self.batch = batch

    def sources(self, n: int) -> tuple[list[bytes], list[int]]:
        return [b"\x7f\x00\x00\x01"] * n, list(range(4000, 4000 + n))

    def received_ns(self, n: int) -> list[int]:
        return [NOW_NS] * n

    def data(self, n: int) -> list[bytes]:
        return self.items[:n]


class RecordingSender:
    """Which slots each send carried, and what."""

    def __init__(self) -> None:
        self.sends: list[list[int]] = []
        self.sent: dict[int, bytes] = {}

    def send(
        self,
        replies: Sequence[bytes | None],
        stamp: Callable[[], bytes] | None = None,
        complete: Collection[int] = (),
    ) -> int:
        slots = [i for i, r in enumerate(replies) if r is not None]
        self.sends.append(slots)
        for i in slots:
            reply = replies[i]
            assert reply is not None
            self.sent[i] = reply
        return 0

    def send_one(self, slot: int, reply: bytes) -> int:
        self.sends.append([slot])
        self.sent[slot] = reply
        return 0


class SealBudgetTests(unittest.TestCase):
    """Sealed replies of a full batch share a send while sealing them stays
    within the budget; in any other batch each goes alone."""

    def batch(self, step_ns: int, *, full: bool = True) -> list[list[int]]:
        store = memory_keys(NOW)
        client = Client(store)
        protocol = TimeProtocol(
            "ntp",
            AnsweringCore(
                NtsResponder(NtpResponder(lambda: STATE, CountingClock()), store), None
            ),
            Clock(),
        )
        ticks = itertools.count(0, step_ns)
        protocol.seal_clock_ns = lambda: next(ticks)
        sender = RecordingSender()
        requests = [header()] + [client.request() for _ in range(8)]
        size = len(requests) if full else 64
        protocol.batch_received(
            ListReceiver(requests, size),  # type: ignore[arg-type]
            sender,  # type: ignore[arg-type]
            len(requests),
        )
        self.assertEqual(protocol.counters.answered, 9)
        for i in range(1, 9):
            ext.open_response(sender.sent[i], client.s2c, client.unique_id)
        return sender.sends

    def test_quick_sealing_shares_sends(self) -> None:
        self.assertEqual(self.batch(0), [[0], list(range(1, 9))])

    def test_a_send_whenever_the_budget_is_spent(self) -> None:
        # Each clock read 7/20 of the budget after the last: every third
        # sealing crosses it.
        step = SEAL_BUDGET_NS * 7 // 20
        self.assertEqual(self.batch(step), [[0], [1, 2, 3], [4, 5, 6], [7, 8]])

    def test_slow_sealing_sends_each_alone(self) -> None:
        self.assertEqual(self.batch(SEAL_BUDGET_NS), [[i] for i in range(9)])

    def test_a_batch_that_is_not_full_sends_each_alone(self) -> None:
        # No backlog: every sealed reply leaves right after its own sealing.
        self.assertEqual(self.batch(0, full=False), [[i] for i in range(9)])


class ClientSideTests(unittest.TestCase):
    def test_open_response_rejects(self) -> None:
        s2c = AESSIV(os.urandom(32))
        uid = os.urandom(32)
        good = ext.build_response(header(), uid, s2c, [b"c" * 104], os.urandom(16))
        self.assertEqual(ext.open_response(good, s2c, uid).cookies, (b"c" * 104,))
        with self.assertRaises(ext.ExtensionError):
            ext.open_response(good, s2c, os.urandom(32))
        with self.assertRaises(ext.ExtensionError):
            ext.open_response(good, AESSIV(os.urandom(32)), uid)
        with self.assertRaises(ext.ExtensionError):
            ext.open_response(good[:40], s2c, uid)
        with self.assertRaises(ext.ExtensionError):
            ext.open_response(
                header() + ext.encode_field(ext.UNIQUE_IDENTIFIER, uid), s2c, uid
            )
        padded = ext.build_response(header(), uid, s2c, [], os.urandom(16), length=400)
        self.assertEqual(len(padded), 400)
        self.assertEqual(ext.open_response(padded, s2c, uid).cookies, ())
