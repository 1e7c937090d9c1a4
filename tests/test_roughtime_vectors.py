"""RFC 10049 Appendix B: a real three-server chain, checked byte for byte.

The example report was made by draft-era servers: its signatures verify
with the draft spelling of the context strings (``RoughTime``), not with the
RFC's (``Roughtime``). That is the one wire difference between
draft-ietf-ntp-roughtime-19 and the RFC, and these vectors pin both sides
of it. The data also shows the *first* server a day ahead of the other two
(the RFC's prose names the third).
"""

from __future__ import annotations

import base64
import itertools
import json

from twisted.trial import unittest

from udptime.roughtime import verify, wire

# The report exactly as printed (base64 rewrapped, values unchanged).
APPENDIX_B = {
    "responses": [
        {
            "publicKey": "FnDyLV/68ephhLdFJbdEGCdkVvpXDaVe5PYvRDdlOOY=",
            "request": (
                "Uk9VR0hUSU0ABAAABQAAAAQAAAAkAAAARAAAAEgAAABWRVIAU1JWAE5PTkNUWVBF"
                "WlpaWgEAAACf4gKLPdPfiNTv93lrhNqYgyehDgMyHFmA1BrAhM1QEDBh9lBlN6LU"
                "ye6zghiqSWMwyNm0IucxQxW3zTMrwj4dAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
            ),
            "response": (
                "Uk9VR0hUSU2UAQAABwAAAEAAAABgAAAAZAAAAGQAAADAAAAAWAEAAFNJRwBOT05D"
                "VFlQRVBBVEhTUkVQQ0VSVElORFhBWL64CToGs4v/4UtfN/80HLFiA09vGIDRP/zT"
                "jcTj8/1DlZWCsVja6RlfwaYnc1wfJqThfhcuSDonrTGyKngBMGH2UGU3otTJ7rOC"
                "GKpJYzDI2bQi5zFDFbfNMyvCPh0BAAAABQAAAAQAAAAIAAAAEAAAABQAAABWRVIA"
                "UkFESU1JRFBWRVJTUk9PVAEAAAADAAAAQ0u4aQAAAAABAAAAc86AWYB/O3Kxzsx4"
                "d5P5cbSOftJUA8bWVtVrQ3tc+b0CAAAAQAAAAFNJRwBERUxFI2B5tbj5ePjVKYE0"
                "PAL1NmgZOAsqh/E2from9Ol5BAnVcLje0C6exbXY8hE3dRvYV01Alru8Ocle+jOZ"
                "T5r8AwMAAAAgAAAAKAAAAFBVQktNSU5UTUFYVKqljhhqi4A54vW20e+slwViPyxy"
                "bNnqKXzimIiIUHQMaBCvaQAAAADYyd9pAAAAAAAAAAA="
            ),
        },
        {
            "publicKey": "l9cdSuR8dFxtG9aJo9pWzUXaX8pftNG4UDC45Qk3znc=",
            "rand": "v/DirVBRQLGtictYD7mN3px02UlMT4J3haTRomt1NNM=",
            "request": (
                "Uk9VR0hUSU0ABAAABQAAAAQAAAAkAAAARAAAAEgAAABWRVIAU1JWAE5PTkNUWVBF"
                "WlpaWgEAAABFCvadUKPN/U9OXqFalVFnv/EhsAuPPpBYfo5MDULZKv335kbNTZcs"
                "YLM96o77yLbvvRk1fm2TQB4yKxbP1jzeAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
            ),
            "response": (
                "Uk9VR0hUSU2UAQAABwAAAEAAAABgAAAAZAAAAGQAAADAAAAAWAEAAFNJRwBOT05D"
                "VFlQRVBBVEhTUkVQQ0VSVElORFj+2I02cCBAfDYzP+8znW6bICqVrAF23xNLfM+Q"
                "ycmkpfp1+BQSb4l/6mRll66l2VIfPSQzigl2V5OJgQzGEBcG/ffmRs1Nlyxgsz3q"
                "jvvItu+9GTV+bZNAHjIrFs/WPN4BAAAABQAAAAQAAAAIAAAAEAAAABQAAABWRVIA"
                "UkFESU1JRFBWRVJTUk9PVAEAAAADAAAAw/m2aQAAAAABAAAAS8ROJoXIPSlO9yN+"
                "uREb+/UiOJJqCjx3VWZ/vD2FqBMCAAAAQAAAAFNJRwBERUxFw0MFQMiDoHySot8r"
                "lnV83Vqaa3qTrAY15W1TzqNuAurOvreNw08BfUwxF7BQ/b/JCwCQcqtD5uRYsvik"
                "vuyLCwMAAAAgAAAAKAAAAFBVQktNSU5UTUFYVCQs/eCxtWjVrXyse0SeojyZdNFk"
                "Owe3B3nLHtHJZK/9gRCvaQAAAADxyd9pAAAAAAAAAAA="
            ),
        },
        {
            "publicKey": "lRhHag6fn2wZQ6idy10ChgpRgks3gvdMM2hWNeJNgXg=",
            "rand": "lMvMVoLsakxc5ZmMzEFQ8hh1FaDo2gCXXIX/L4QPSxQ=",
            "request": (
                "Uk9VR0hUSU0ABAAABQAAAAQAAAAkAAAARAAAAEgAAABWRVIAU1JWAE5PTkNUWVBF"
                "WlpaWgEAAADmAab6GlTSr3xRmwwwvRjW6EKRhtyWYYWZHZIGnF8w2b4DuIICvoCW"
                "TwCaupBfcOEwV+RqBWB6L1JUGn+ot8+9AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=="
            ),
            "response": (
                "Uk9VR0hUSU2UAQAABwAAAEAAAABgAAAAZAAAAGQAAADAAAAAWAEAAFNJRwBOT05D"
                "VFlQRVBBVEhTUkVQQ0VSVElORFg8MlhdCJeQ2qzN6b9q646W9kB+XmAdSg7ToU1g"
                "j3AD8AP8eCHfduMBE0E8j4/LqWIr72zWQx8Y1U/1uxs97yMAvgO4ggK+gJZPAJq6"
                "kF9w4TBX5GoFYHovUlQaf6i3z70BAAAABQAAAAQAAAAIAAAAEAAAABQAAABWRVIA"
                "UkFESU1JRFBWRVJTUk9PVAEAAAADAAAAw/m2aQAAAAABAAAA6ho4+0Cml+VJbqU7"
                "hsF717uusV2HYvRbU9CdjJE/Zn0CAAAAQAAAAFNJRwBERUxFM9Fvq8T9kOrxcS7j"
                "viCPHe44HX/75Je1hafPJ0f8NoASy29EgD7C0c/LMxXiXxEwyuxYTPN9oseAr9XI"
                "t68uDwMAAAAgAAAAKAAAAFBVQktNSU5UTUFYVMxBDiNG247IO4onsGcjFHsA3vP+"
                "arl+s0lBLhXw0c1RlBCvaQAAAAAEyt9pAAAAAAAAAAA="
            ),
        },
    ]
}


DRAFT = {
    "response_context": wire.DRAFT_RESPONSE_CONTEXT,
    "delegation_context": wire.DRAFT_DELEGATION_CONTEXT,
}


def links() -> list[verify.ChainLink]:
    return verify.parse_report(APPENDIX_B)


class AppendixBTests(unittest.TestCase):
    def test_request_layout(self) -> None:
        link = links()[0]
        self.assertEqual(len(link.request), 1036)
        request = wire.parse_request(link.request)
        self.assertEqual(request.versions, (wire.VERSION_1,))
        self.assertEqual(request.srv, wire.srv_value(link.public_key))
        pairs = wire.decode_message(wire.decode_packet(link.request))
        self.assertEqual(
            [wire.tag_name(t) for t in pairs], ["VER", "SRV", "NONC", "TYPE", "ZZZZ"]
        )
        self.assertEqual(pairs[wire.ZZZZ], bytes(912))

    def test_responses_verify_with_the_draft_contexts(self) -> None:
        for link in links():
            result = verify.verify_response(
                link.request, link.response, link.public_key, **DRAFT
            )
            self.assertEqual(result.version, wire.VERSION_1)
            self.assertEqual(result.radius, 3)
            self.assertEqual(result.response.path, ())
            self.assertEqual(result.response.index, 0)
            self.assertEqual(len(link.response), wire.response_size(0))

    def test_rfc_contexts_reject_the_draft_signatures(self) -> None:
        for link in links():
            with self.assertRaises(verify.VerificationError) as caught:
                verify.verify_response(link.request, link.response, link.public_key)
            self.assertEqual(caught.exception.reason, "delegation")

    def test_chain_and_its_inconsistency(self) -> None:
        results = verify.verify_chain(links(), **DRAFT)
        self.assertEqual(
            [r.midpoint for r in results], [1773685571, 1773599171, 1773599171]
        )
        self.assertEqual(verify.inconsistencies(results), [(0, 1), (0, 2)])

    def test_chained_nonces(self) -> None:
        chain = links()
        for previous, link in itertools.pairwise(chain):
            assert link.rand is not None
            nonce = wire.parse_request(link.request).nonce
            self.assertEqual(nonce, verify.chained_nonce(previous.response, link.rand))

    def test_a_broken_chain_is_refused(self) -> None:
        chain = links()
        chain[2] = verify.ChainLink(
            chain[2].public_key, chain[2].request, chain[2].response, bytes(32)
        )
        with self.assertRaises(verify.VerificationError) as caught:
            verify.verify_chain(chain, **DRAFT)
        self.assertEqual(caught.exception.reason, "chain")

    def test_report_round_trip(self) -> None:
        report = verify.malfeasance_report(links())
        text = json.dumps(report)
        self.assertEqual(verify.parse_report(json.loads(text)), links())
        first, second = report["responses"][:2]
        self.assertNotIn("rand", first)
        self.assertEqual(
            base64.b64decode(second["rand"]),
            base64.b64decode("v/DirVBRQLGtictYD7mN3px02UlMT4J3haTRomt1NNM="),
        )
