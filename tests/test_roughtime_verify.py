"""The client's checks on crafted replies, server lists, and chains."""

from __future__ import annotations

import functools
import json
from typing import Any

from twisted.trial import unittest

from udptime.roughtime import keys, verify, wire
from udptime.roughtime.responder import RoughtimeResponder

NOW = 1_800_000_000
NS = 1_000_000_000
ROOT = keys.generate_key()
ROOT_PUBLIC = keys.public_bytes(ROOT)
NONCE = bytes(range(32))


def craft(
    request: bytes,
    *,
    midpoint: int = NOW,
    radius: int = 5,
    version: int = wire.VERSION_1,
    versions: tuple[int, ...] = (wire.VERSION_1,),
    window: tuple[int, int] = (NOW - 60, NOW + 60),
    srep_extra: dict[int, bytes] | None = None,
    top_extra: dict[int, bytes] | None = None,
    kind: int = wire.TYPE_RESPONSE,
) -> bytes:
    """A validly signed single-leaf reply saying whatever the test wants."""
    delegation = keys.delegate(ROOT, *window)
    srep_pairs = {
        wire.VER: wire.u32(version),
        wire.RADI: wire.u32(radius),
        wire.MIDP: wire.u64(midpoint),
        wire.VERS: b"".join(wire.u32(v) for v in versions),
        wire.ROOT: wire.digest(b"\x00" + request),
        **(srep_extra or {}),
    }
    srep = wire.encode_message(srep_pairs)
    top = {
        wire.SIG: delegation.sign(srep),
        wire.NONC: wire.parse_request(request).nonce,
        wire.TYPE: wire.u32(kind),
        wire.PATH: b"",
        wire.SREP: srep,
        wire.CERT: delegation.cert,
        wire.INDX: wire.u32(0),
        **(top_extra or {}),
    }
    return wire.encode_packet(wire.encode_message(top))


def reason(request: bytes, response: bytes) -> str:
    try:
        verify.verify_response(request, response, ROOT_PUBLIC)
    except verify.VerificationError as e:
        return e.reason
    return "valid"


class CraftedReplyTests(unittest.TestCase):
    def setUp(self) -> None:
        self.request = verify.make_request(NONCE, public_key=ROOT_PUBLIC)

    def test_crafted_baseline_is_valid(self) -> None:
        result = verify.verify_response(self.request, craft(self.request), ROOT_PUBLIC)
        self.assertEqual((result.midpoint, result.radius), (NOW, 5))
        self.assertEqual((result.earliest, result.latest), (NOW - 5, NOW + 5))

    def test_midpoint_outside_the_delegation(self) -> None:
        for midpoint in (NOW - 61, NOW + 61):
            response = craft(self.request, midpoint=midpoint)
            self.assertEqual(reason(self.request, response), "delegation-window")
        self.assertEqual(
            reason(self.request, craft(self.request, midpoint=NOW + 60)), "valid"
        )

    def test_zero_radius(self) -> None:
        self.assertEqual(reason(self.request, craft(self.request, radius=0)), "radius")

    def test_versions(self) -> None:
        draft = craft(self.request, version=0x8000000C, versions=(1, 0x8000000C))
        self.assertEqual(reason(self.request, draft), "version")
        missing = craft(self.request, versions=(0x8000000C,))
        self.assertEqual(reason(self.request, missing), "version")

    def test_response_type(self) -> None:
        response = craft(self.request, kind=wire.TYPE_REQUEST)
        self.assertEqual(reason(self.request, response), "format")

    def test_grease_tags_ignored(self) -> None:
        extra = {wire.tag("GRSE"): b"1234"}
        response = craft(self.request, srep_extra=extra, top_extra=extra)
        self.assertEqual(reason(self.request, response), "valid")

    def test_other_nonce(self) -> None:
        other = verify.make_request(bytes(32))
        self.assertEqual(reason(other, craft(self.request)), "nonce")

    def test_make_request(self) -> None:
        request = wire.parse_request(verify.make_request(random=lambda n: b"\x07" * n))
        self.assertEqual(request.nonce, b"\x07" * 32)
        self.assertIsNone(request.srv)


APPENDIX_A = """{
  "servers": [
    {"name": "example.com Roughtime server", "version": 1,
     "publicKeyType": "ed25519",
     "publicKey": "2O3mkkheDExCuhG+ZNIoWmO/IdCdLzADgUn8SnC4hME=",
     "addresses": [
       {"protocol": "udp", "address": "roughtime.example.com:5319"},
       {"protocol": "tcp", "address": "roughtime.example.com:5319"}]},
    {"name": "A UDP-only server specified with IP addresses", "version": 1,
     "publicKeyType": "ed25519",
     "publicKey": "ZYfeGa94YuG1IZrV3kR9+8/nmZ2lX2XyHmiSb+wI0OY=",
     "addresses": [
       {"protocol": "udp", "address": "192.0.2.33:5319"},
       {"protocol": "udp", "address": "[2001:db8::2:33]:5319"}]}],
  "sources": ["https://www.example.net/roughtime/ecosystem.json",
              "https://www.example.org/roughtime/ecosystem.json"],
  "reports":  "https://www.example.net/roughtime/malfeasance"
}"""


class ServerListTests(unittest.TestCase):
    def test_appendix_a(self) -> None:
        servers = verify.parse_server_list(APPENDIX_A)
        self.assertEqual(len(servers.servers), 2)
        first, second = servers.servers
        self.assertTrue(first.usable)
        self.assertEqual(first.version, 1)
        self.assertEqual(
            first.addresses,
            (
                verify.Address("udp", "roughtime.example.com", 5319),
                verify.Address("tcp", "roughtime.example.com", 5319),
            ),
        )
        self.assertEqual(
            second.addresses[1], verify.Address("udp", "2001:db8::2:33", 5319)
        )
        self.assertEqual(
            servers.reports, "https://www.example.net/roughtime/malfeasance"
        )
        self.assertEqual(len(servers.sources), 2)

    def test_bad_lists(self) -> None:
        good = json.loads(APPENDIX_A)
        breakages = [
            ("version", "1"),
            ("version", True),
            ("publicKey", "short"),
            ("publicKey", "AAAA"),
            ("addresses", [{"protocol": "sctp", "address": "a:1"}]),
            ("addresses", [{"protocol": "udp", "address": "no-port"}]),
            ("addresses", [{"protocol": "udp", "address": "host:65536"}]),
            ("addresses", [{"protocol": "udp", "address": "2001:db8::1:5319"}]),
            ("addresses", [{"protocol": "udp", "address": "[fe80::1%eth0]:5319"}]),
            ("name", None),
        ]
        for name, value in breakages:
            document = json.loads(APPENDIX_A)
            document["servers"][0][name] = value
            with self.assertRaises(verify.ServerListError, msg=(name, value)):
                verify.parse_server_list(json.dumps(document))
        for text in ("[]", "{}", "not json", json.dumps({**good, "reports": 3})):
            self.assertRaises(verify.ServerListError, verify.parse_server_list, text)

    def test_other_key_types_kept_but_unusable(self) -> None:
        document = json.loads(APPENDIX_A)
        document["servers"][0]["publicKeyType"] = "ml-dsa-44"
        document["servers"][0]["publicKey"] = "AAAA"
        servers = verify.parse_server_list(json.dumps(document))
        self.assertFalse(servers.servers[0].usable)

    def test_our_entry_round_trips(self) -> None:
        entry = verify.server_entry(
            "test",
            ROOT_PUBLIC,
            [("udp", "192.0.2.1", 5319), ("udp", "2001:db8::1", 5319)],
        )
        self.assertEqual(entry["addresses"][1]["address"], "[2001:db8::1]:5319")
        parsed = verify.parse_server_list(json.dumps({"servers": [entry]}))
        server = parsed.servers[0]
        self.assertEqual(server.public_key, ROOT_PUBLIC)
        self.assertEqual(
            server.addresses[1], verify.Address("udp", "2001:db8::1", 5319)
        )


class ChainTests(unittest.TestCase):
    def test_measurement_sequence(self) -> None:
        """Three servers queried in turn, the third a day ahead: the chain
        verifies and the report shows the inconsistency."""
        roots = [keys.generate_key() for _ in range(3)]
        offsets = [0, 1, 86_400]
        links = []
        previous: bytes | None = None
        for n, (root, offset) in enumerate(zip(roots, offsets)):
            now = NOW + n + offset
            delegation = keys.delegate(root, now - 100, now + 100)
            server = RoughtimeResponder(
                delegation, lambda: (True, 0), now_ns=functools.partial(int, now * NS)
            )
            rand = None if previous is None else bytes([n]) * 32
            nonce = (
                NONCE
                if previous is None or rand is None
                else verify.chained_nonce(previous, rand)
            )
            request = verify.make_request(nonce, public_key=keys.public_bytes(root))
            response = server.answer(request, now * NS)
            assert response is not None
            links.append(
                verify.ChainLink(keys.public_bytes(root), request, response, rand)
            )
            previous = response
        results = verify.verify_chain(links)
        self.assertEqual(verify.inconsistencies(results), [])
        # Reversed in time, the day-ahead answer comes before the others.
        self.assertEqual(
            verify.inconsistencies(list(reversed(results))), [(0, 1), (0, 2)]
        )
        report = json.loads(json.dumps(verify.malfeasance_report(links)))
        self.assertEqual(verify.parse_report(report), links)
        self.assertEqual(len(verify.verify_chain(verify.parse_report(report))), 3)

    def test_bad_reports(self) -> None:
        documents: list[dict[str, Any]] = [
            {},
            {"responses": []},
            {"responses": [{"publicKey": "AAAA", "request": 1, "response": "AAAA"}]},
            {
                "responses": [
                    {"publicKey": "AAAA", "request": "AAAA", "response": "AAAA"},
                    {"publicKey": "AAAA", "request": "AAAA", "response": "AAAA"},
                ]
            },
        ]
        for document in documents:
            self.assertRaises(verify.ServerListError, verify.parse_report, document)
