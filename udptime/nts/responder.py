"""The ``ntp`` format's responder with NTS (RFC 8915 section 5).

Plain requests (48 bytes, or extension fields none of which are NTS) go to
the wrapped :class:`udptime.responders.ntp.NtpResponder` untouched. An NTS
request is answered with that same 48-byte header followed by the Unique
Identifier and an Authenticator, sealed with the session's S2C key, carrying
one fresh cookie per cookie spent or asked for; the reply is padded to the
length of the request up to its Authenticator (later fields are
unauthenticated and discarded, section 5.7) and never exceeds it. A request whose cookie does not open
or whose authenticator does not verify gets an NTS NAK; a malformed NTS
request gets nothing. A Unique Identifier without NTS (section 5.3) gets
the plain reply with the identifier echoed.

The reply authenticates its own transmit stamp, so it cannot be stamped
late by the shell. Instead everything but the stamp is done while the
request is answered (cookie opened, request verified, new cookies sealed,
plaintext and lengths laid out, ciphers ready) and the reply is a *sealer*
(:data:`udptime.core.Sealer`): the shell calls it right before the send
that carries it, and it reads the clock, packs the header and runs the one
AEAD call that must follow the stamp.

Cost per reply is four AES-SIV calls and little else: the C2S/S2C ciphers
of recent clients are cached by cookie plaintext (building them costs more
than using them), nonces come from a pool filled with one ``os.urandom``
call, and fields are found with ``struct`` (``scan_request``).
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from udptime.core import Reply, Sealer
from udptime.ntp import (
    KISS_NTSN,
    PACKET_SIZE,
    build_kiss,
    fixed_from_ns,
    kiss_reply,
)
from udptime.ntp import parse_request as parse_ntp_request
from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    KEY_ID_LENGTH,
    CookieKeys,
    MasterKey,
)
from udptime.nts.extensions import (
    AUTHENTICATOR,
    MAX_COOKIES,
    MIN_NONCE_LENGTH,
    NTS_COOKIE,
    SIV_TAG_LENGTH,
    ExtensionError,
    Layout,
    encrypted_placeholders,
    scan_request,
)
from udptime.nts.keyset import KeySet
from udptime.responders.ntp import NtpResponder

_V4_CLIENT = 4 << 3 | 3
#: Ciphers kept for this many recent sessions (two AESSIV objects each).
CIPHER_CACHE = 1024
#: Random bytes drawn per ``os.urandom`` call, shared by reply and cookie nonces.
RANDOM_POOL = 4096
_NONCE = MIN_NONCE_LENGTH
_EF_HEADER = struct.Struct("!HH")
#: Authenticator EF header, nonce and ciphertext lengths.
_AUTH_HEAD = struct.Struct("!HHHH")
_KEY_ID = struct.Struct("!I")
_MASK64 = (1 << 64) - 1
#: The most a sealed reply's stamp is moved ahead for its signing: one slow
#: sealing (a garbage collection, a cold cache) must not push stamps far.
MAX_LEAD_NS = 20_000
_LENGTHS = struct.Struct("!HH").unpack_from
#: Reply bytes 0-39: head, origin (the request's transmit), receive stamp.
_PREFIX = struct.Struct("!24s8sQ").pack
#: A cookie is its plaintext plus key id, nonce and SIV tag.
COOKIE_OVERHEAD = KEY_ID_LENGTH + COOKIE_NONCE_LENGTH + SIV_TAG_LENGTH


@dataclass
class NtsCounters:
    """What the NTS path did, per responder (plain requests are not counted)."""

    authenticated: int = 0
    naks: int = 0
    malformed: int = 0
    cookies: int = 0
    #: Unique Identifiers without NTS, echoed (RFC 8915 section 5.3).
    echoed: int = 0


class CookieJar(Protocol):
    """The master keys as the datagram path sees them: read once per request,
    so a rotation (a new :class:`KeySet` swapped in) applies at once."""

    @property
    def key_set(self) -> KeySet: ...


def _no_clock() -> int:
    return 0


def _echo_reply(prefix: bytes, stamp: Callable[[], bytes], unique_id: bytes) -> bytes:
    """A plain reply echoing a Unique Identifier, stamped now."""
    return prefix + stamp() + unique_id


class NtsResponder:
    """The ``ntp`` responder, plus NTS: plain requests go to the NTP responder.

    Replies to NTS requests are sealers (see the module docstring) and are
    listed as complete in a batch. Refusals (RATE, DENY kisses) to an NTS
    request are NTS replies too: they echo the Unique Identifier and, when
    the cookie opens, are authenticated and carry fresh cookies, so that a
    client (RFC 8915 section 5.7) acts on them instead of discarding them.

    NTS is defined for NTPv4 only: NTS fields in a request of another
    version (or mode) make it malformed, and it is dropped, never answered
    without its Unique Identifier (section 5.3). chronyd drops such
    requests too.
    """

    __slots__ = (
        "_ciphers",
        "_fits",
        "_key_set",
        "_keys",
        "_lead",
        "_lead_ns",
        "_ntp",
        "_opens",
        "_perf_ns",
        "_pool",
        "_pool_at",
        "_random",
        "_sealer",
        "_stamp",
        "counters",
    )

    late_stamp = True
    echoes_anything = False
    kisses = True

    def __init__(
        self,
        ntp: NtpResponder,
        keys: CookieJar,
        *,
        random: Callable[[int], bytes] = os.urandom,
        perf_ns: Callable[[], int] | None = None,
    ) -> None:
        self._ntp = ntp
        #: times signing, to move stamps ahead by it; ``None``: no lead
        #: (the wiring passes ``time.perf_counter_ns``; tests stay exact)
        self._perf_ns = perf_ns or _no_clock
        #: how far ahead of the clock read a sealed reply's stamp is put
        self._lead_ns = 0
        self._lead = 0  # the same in NTP fixed point (2**-32 s)
        self._stamp = ntp.stamp
        self._keys = keys
        self._random = random
        self._pool = b""
        self._pool_at = 0
        self._ciphers: OrderedDict[bytes, tuple[AESSIV, AESSIV]] = OrderedDict()
        self._fits: dict[
            tuple[int, int, int, int], tuple[int, bytes, bytes, bytes]
        ] = {}
        self._key_set: KeySet | None = None
        self._opens: Mapping[bytes, MasterKey] = {}
        self._sealer: MasterKey | None = None
        self.counters = NtsCounters()

    # -- the Responder protocol --------------------------------------------

    def answer(self, request: bytes, received_ns: int) -> Reply | None:
        if len(request) > PACKET_SIZE:
            layout = self._scan(request)
            if layout is not None:
                return self._reply(request, received_ns, layout) if layout else None
        return self._ntp.answer(request, received_ns)

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[Sequence[Reply | None], Collection[int]]:
        """Plain requests as one NTP batch (stamped late); NTS ones complete."""
        for request in requests:
            if len(request) > PACKET_SIZE:
                break
        else:
            return self._ntp.answer_batch(requests, received_ns)
        replies: list[Reply | None] = [None] * len(requests)
        complete: list[int] = []
        plain: list[int] = []
        for i, request in enumerate(requests):
            if len(request) > PACKET_SIZE:
                layout = self._scan(request)
                if layout is not None:
                    if layout:
                        reply = self._reply(request, received_ns[i], layout)
                        if reply is not None:
                            replies[i] = reply
                            complete.append(i)
                    continue
            plain.append(i)
        if plain:
            answered, _ = self._ntp.answer_batch(
                [requests[i] for i in plain], [received_ns[i] for i in plain]
            )
            for i, reply in zip(plain, answered):
                replies[i] = reply
        return replies, complete

    def stamp(self) -> bytes:
        return self._stamp()

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        if len(request) > PACKET_SIZE:
            layout = self._scan(request)
            if layout is not None:
                if not layout:
                    return None
                reply = self._reply(request, 0, layout, why)
                assert reply is None or isinstance(reply, bytes)
                return reply
        return kiss_reply(request, why)

    # -- NTS ------------------------------------------------------------------

    def _scan(self, request: bytes) -> Layout | None | tuple[()]:
        """The NTS fields, ``None`` for plain NTP, ``()`` for malformed."""
        try:
            layout = scan_request(request)
        except ExtensionError:
            self.counters.malformed += 1
            return ()
        if layout is not None and request[0] & 0x3F != _V4_CLIENT:
            self.counters.malformed += 1
            return ()
        return layout

    def _reply(
        self,
        request: bytes,
        received_ns: int,
        layout: Layout,
        kiss: bytes | None = None,
    ) -> Reply | None:
        """The reply to a request with NTS fields: a sealer, or complete
        bytes for a kiss (which carries no time of ours).

        The hot path of NTS: helpers are inlined where a call would cost
        more than the line it saves.
        """
        uid, uid_end, cookie, cookie_end, placeholders, auth, auth_end = layout
        unique_id = request[uid:uid_end]
        if auth < 0:
            return self._echo(request, received_ns, unique_id, kiss)
        key_set = self._keys.key_set
        if key_set is not self._key_set:
            self._use(key_set)
        body = request[cookie + 4 : cookie_end]
        master = self._opens.get(body[:4])
        plain = master.open_plaintext(body) if master is not None else None
        if plain is None:
            return self._nak(request, unique_id, kiss or KISS_NTSN)
        ciphers = self._ciphers.get(plain)
        if ciphers is None:
            ciphers = self._new_ciphers(plain)
            if ciphers is None:
                return self._nak(request, unique_id, kiss or KISS_NTSN)
        else:
            self._ciphers.move_to_end(plain)
        c2s, s2c = ciphers
        nonce_length, ciphertext_length = _LENGTHS(request, auth + 4)
        start = auth + 8 + (nonce_length + 3 & ~3)
        if (
            nonce_length < 1
            or ciphertext_length < SIV_TAG_LENGTH
            or auth
            + 8
            + max(nonce_length + 3 & ~3, _NONCE)
            + (ciphertext_length + 3 & ~3)
            > auth_end
        ):
            self.counters.malformed += 1
            return None
        try:
            inner = c2s.decrypt(
                request[start : start + ciphertext_length],
                [request[:auth], request[auth + 8 : auth + 8 + nonce_length]],
            )
        except InvalidTag:
            return self._nak(request, unique_id, kiss or KISS_NTSN)
        wanted = 1 + placeholders
        if inner:
            try:
                wanted += encrypted_placeholders(inner, cookie_end - cookie - 4)
            except ExtensionError:
                self.counters.malformed += 1
                return None
        # The reply is at most as long as the authenticated request: fields
        # after the authenticator are discarded (section 5.7). New cookies
        # are as long as the one presented (same plaintext), a multiple of
        # 4 bytes: their fields need no padding.
        cookie_field = 4 + COOKIE_OVERHEAD + len(plain)
        fit = (auth_end, uid_end - uid, cookie_field, wanted)
        layout_out = self._fits.get(fit)
        if layout_out is None:
            layout_out = self._fit(*fit)
        count, cookie_head, auth_head, padding = layout_out
        need = (count + 1) * _NONCE
        at = self._pool_at
        if at + need > len(self._pool):
            self._pool = self._random(max(RANDOM_POOL, need))
            at = 0
        self._pool_at = at + need
        pool = self._pool
        nonce = pool[at : at + _NONCE]
        seal = self._sealer.seal_plaintext  # type: ignore[union-attr]
        if count == 1:
            plaintext = cookie_head + seal(plain, pool[at + _NONCE : at + need])
        else:
            plaintext = b"".join(
                [
                    cookie_head + seal(plain, pool[j : j + _NONCE])
                    for j in range(at + _NONCE, at + need, _NONCE)
                ]
            )
        if kiss is not None:
            head = kiss_reply(request, kiss)
            if head is None:
                return None
            self.counters.authenticated += 1
            self.counters.cookies += count
            associated = head + unique_id
            return (
                associated
                + auth_head
                + nonce
                + s2c.encrypt(plaintext, [associated, nonce])
                + padding
            )
        head = self._ntp.head(request)
        if head is None:
            return None
        self.counters.authenticated += 1
        self.counters.cookies += count
        return partial(
            self._seal,
            _PREFIX(head, request[40:48], fixed_from_ns(received_ns)),
            unique_id,
            s2c,
            plaintext,
            nonce,
            auth_head + nonce,
            padding,
        )

    def _seal(
        self,
        prefix: bytes,
        unique_id: bytes,
        s2c: AESSIV,
        plaintext: bytes,
        nonce: bytes,
        auth_head: bytes,
        padding: bytes,
    ) -> bytes:
        """The NTS reply, stamped now: all that has to follow the clock read.

        The stamp is moved ahead by what signing recently took (measured
        here, averaged, capped), as ntpd's ``authdelay`` once did for its
        MACs: the reply leaves that much after the clock read, which a plain
        reply, stamped by the shell, does not.
        """
        started = self._perf_ns()
        stamp = (int.from_bytes(self._stamp(), "big") + self._lead) & _MASK64
        associated = prefix + stamp.to_bytes(8, "big") + unique_id
        reply = (
            associated
            + auth_head
            + s2c.encrypt(plaintext, [associated, nonce])
            + padding
        )
        took = min(max(self._perf_ns() - started, 0), MAX_LEAD_NS)
        lead = self._lead_ns + (took - self._lead_ns) // 4
        self._lead_ns = lead
        self._lead = (lead << 32) // 1_000_000_000
        return reply

    def _echo(
        self, request: bytes, received_ns: int, unique_id: bytes, kiss: bytes | None
    ) -> Reply | None:
        """A Unique Identifier without NTS: the plain reply, the field echoed."""
        if kiss is not None:
            head = kiss_reply(request, kiss)
            return None if head is None else head + unique_id
        head = self._ntp.head(request)
        if head is None:
            return None
        self.counters.echoed += 1
        prefix = _PREFIX(head, request[40:48], fixed_from_ns(received_ns))
        sealer: Sealer = partial(_echo_reply, prefix, self._stamp, unique_id)
        return sealer

    def _nak(self, request: bytes, unique_id: bytes, code: bytes) -> bytes | None:
        """An unauthenticated kiss echoing the Unique Identifier (NTSN: a NAK)."""
        if code == KISS_NTSN:
            parsed = parse_ntp_request(request)
            if parsed is None:
                return None
            self.counters.naks += 1
            return build_kiss(parsed, code) + unique_id
        kiss = kiss_reply(request, code)
        return None if kiss is None else kiss + unique_id

    # -- caches ---------------------------------------------------------------

    def _use(self, key_set: KeySet) -> None:
        """Index a newly swapped-in key set by the key ids cookies start with:
        every key it opens with (the schedule's and the accepted ones)."""
        self._opens = {
            _KEY_ID.pack(key.key_id): key for key in (*key_set.keys, *key_set.accepted)
        }
        self._sealer = key_set.current
        self._key_set = key_set

    def _new_ciphers(self, plain: bytes) -> tuple[AESSIV, AESSIV] | None:
        """A session's C2S and S2C ciphers, made and cached; ``None`` for a
        plaintext that is not one of ours (it was sealed by us, so only a
        bug or a damaged keys file gets here)."""
        keys = CookieKeys.from_plaintext(plain)
        if keys is None:
            return None
        cache = self._ciphers
        ciphers = cache[plain] = AESSIV(keys.c2s), AESSIV(keys.s2c)
        if len(cache) > CIPHER_CACHE:
            cache.popitem(last=False)
        return ciphers

    def _fit(
        self, size: int, uid_field: int, cookie_field: int, wanted: int
    ) -> tuple[int, bytes, bytes, bytes]:
        """How many new cookies a reply of *size* bytes holds, and the bytes
        that follow from it: cookie EF header, Authenticator EF header (with
        the nonce and ciphertext lengths), padding to *size* (cached)."""
        fixed = PACKET_SIZE + uid_field + 8 + _NONCE + SIV_TAG_LENGTH
        count = min(wanted, MAX_COOKIES)
        while count > 0 and fixed + count * cookie_field > size:
            count -= 1
        ciphertext = SIV_TAG_LENGTH + count * cookie_field
        auth_length = size - PACKET_SIZE - uid_field
        out = (
            count,
            _EF_HEADER.pack(NTS_COOKIE, cookie_field),
            _AUTH_HEAD.pack(AUTHENTICATOR, auth_length, _NONCE, ciphertext),
            bytes(auth_length - 8 - _NONCE - ciphertext),
        )
        if len(self._fits) >= 256:
            self._fits.clear()
        self._fits[size, uid_field, cookie_field, wanted] = out
        return out
