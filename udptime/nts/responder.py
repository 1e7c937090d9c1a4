"""The ``ntp`` format's responder with NTS (RFC 8915 section 5).

Plain requests (48 bytes, or extension fields none of which are NTS) go to
the wrapped :class:`udptime.ntp.NtpResponder` untouched. An NTS request is
answered with that same 48-byte header followed by the Unique Identifier and
an Authenticator, sealed with the session's S2C key, carrying one fresh
cookie per cookie spent or asked for; the reply is padded to exactly the
request's length and never exceeds it. A request whose cookie does not open
or whose authenticator does not verify gets an NTS NAK; a malformed NTS
request gets nothing.

The transmit stamp is read when the header is built, after the request has
been verified and the cookies sealed, so only the reply's own encryption
lies between the stamp and the send.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from udptime.ntp import KISS_NTSN, PACKET_SIZE, build_kiss, kiss_reply, parse_request
from udptime.nts.cookies import CookieKeys, cookie_length
from udptime.nts.extensions import (
    MIN_NONCE_LENGTH,
    ExtensionError,
    NtsRequest,
    build_nak,
    build_response,
    cookies_that_fit,
    encrypted_placeholders,
    open_authenticator,
    parse_nts_request,
)
from udptime.responders.ntp import NtpResponder

_V4_CLIENT = 4 << 3 | 3


@dataclass
class NtsCounters:
    """What the NTS path did, per responder (plain requests are not counted)."""

    authenticated: int = 0
    naks: int = 0
    malformed: int = 0
    cookies: int = 0


class CookieJar(Protocol):
    """The master keys as the datagram path sees them: seal new cookies, open old."""

    def seal(self, keys: CookieKeys) -> bytes: ...

    def open(self, cookie: bytes) -> CookieKeys | None: ...


class NtsResponder:
    """The ``ntp`` responder, plus NTS: plain requests go to the NTP responder.

    Replies to NTS requests are authenticated as a whole, transmit stamp
    included, so they are complete: the shell must not stamp them late.
    Refusals (RATE, DENY kisses) to an NTS request are NTS replies too: they
    echo the Unique Identifier and, when the cookie opens, are authenticated
    and carry fresh cookies, so that a client (RFC 8915 section 5.7) acts on
    them instead of discarding them.
    """

    __slots__ = ("_keys", "_ntp", "_random", "counters")

    late_stamp = True
    echoes_anything = False
    kisses = True

    def __init__(
        self,
        ntp: NtpResponder,
        keys: CookieJar,
        *,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._ntp = ntp
        self._keys = keys
        self._random = random
        self.counters = NtsCounters()

    def _nts(self, request: bytes) -> NtsRequest | None | bool:
        """The NTS request, ``None`` for plain NTP, ``False`` for malformed."""
        if len(request) <= PACKET_SIZE or request[0] & 0x3F != _V4_CLIENT:
            return None
        try:
            return parse_nts_request(request)
        except ExtensionError:
            self.counters.malformed += 1
            return False

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        nts = self._nts(request)
        if nts is None:
            return self._ntp.answer(request, received_ns)
        return self._answer(
            request, nts, lambda: self._ntp.answer(request, received_ns)
        )

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Collection[int]]:
        """Plain requests as one NTP batch (stamped late); NTS ones complete."""
        extended = [i for i, r in enumerate(requests) if len(r) > PACKET_SIZE]
        if not extended:
            return self._ntp.answer_batch(requests, received_ns)
        replies, _ = self._ntp.answer_batch(requests, received_ns)
        complete: list[int] = []
        for i in extended:
            request = requests[i]
            nts = self._nts(request)
            if nts is None:
                continue
            reply = self._answer(request, nts, partial(self._stamped, replies[i]))
            replies[i] = reply
            if reply is not None:
                complete.append(i)
        return replies, complete

    def stamp(self) -> bytes:
        return self._ntp.stamp()

    def _stamped(self, unstamped: bytes | None) -> bytes | None:
        """A batch reply head, stamped now: after the cookies are sealed."""
        if unstamped is None:
            return None
        return unstamped[:-8] + self._ntp.stamp()

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        nts = self._nts(request)
        if nts is None:
            return kiss_reply(request, why)
        return self._answer(request, nts, lambda: kiss_reply(request, why), kiss=why)

    def _answer(
        self,
        request: bytes,
        nts: NtsRequest | bool,
        header: Callable[[], bytes | None],
        kiss: bytes | None = None,
    ) -> bytes | None:
        if not isinstance(nts, NtsRequest):
            return None
        keys = self._keys.open(nts.cookie)
        if keys is None:
            return self._nak(request, nts, kiss or KISS_NTSN)
        plaintext = open_authenticator(AESSIV(keys.c2s), request, nts.authenticator)
        if plaintext is None:
            return self._nak(request, nts, kiss or KISS_NTSN)
        try:
            wanted = 1 + nts.placeholders
            wanted += encrypted_placeholders(plaintext, len(nts.cookie))
        except ExtensionError:
            self.counters.malformed += 1
            return None
        count = cookies_that_fit(
            len(request), len(nts.unique_id), cookie_length(keys.aead), wanted
        )
        seal = self._keys.seal
        cookies = [seal(keys) for _ in range(count)]
        nonce = self._random(MIN_NONCE_LENGTH)
        s2c = AESSIV(keys.s2c)
        head = header()
        if head is None:
            return None
        self.counters.authenticated += 1
        self.counters.cookies += count
        return build_response(
            head, nts.unique_id, s2c, cookies, nonce, length=len(request)
        )

    def _nak(self, request: bytes, nts: NtsRequest, code: bytes) -> bytes | None:
        """An unauthenticated kiss echoing the Unique Identifier (NTSN: a NAK)."""
        parsed = parse_request(request)
        if parsed is None:
            return None
        if code == KISS_NTSN:
            self.counters.naks += 1
            return build_nak(build_kiss(parsed, code), nts.unique_id)
        kiss = kiss_reply(request, code)
        return None if kiss is None else build_nak(kiss, nts.unique_id)
