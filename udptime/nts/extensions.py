"""NTS extension fields in NTPv4 packets (RFC 8915 section 5, RFC 7822): pure.

An extension field (EF) is a 16-bit type, a 16-bit length counting the
whole field, and a body padded to a multiple of 4 bytes; RFC 7822 makes 16
bytes the least an EF may take (28 for the last one of a packet without a
MAC). NTS uses four types:

- Unique Identifier (0x0104): at least 32 random bytes the reply echoes.
- NTS Cookie (0x0204): one cookie from NTS-KE or an earlier reply.
- NTS Cookie Placeholder (0x0304): asks for one more cookie; as long as the
  cookie, so the reply is never larger than the request.
- NTS Authenticator and Encrypted Extension Fields (0x0404): nonce and AEAD
  ciphertext over the packet before it (the associated data); the
  ciphertext's plaintext is more EFs (the reply's new cookies).

Both sides live here, the server's parse/verify/build and the client's
build/open, so tests and benchmarks can talk NTS without another stack.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

UNIQUE_IDENTIFIER = 0x0104
NTS_COOKIE = 0x0204
COOKIE_PLACEHOLDER = 0x0304
AUTHENTICATOR = 0x0404
NTS_TYPES = frozenset(
    {UNIQUE_IDENTIFIER, NTS_COOKIE, COOKIE_PLACEHOLDER, AUTHENTICATOR}
)

HEADER_LENGTH = 48
MIN_EF_LENGTH = 16
#: RFC 7822: the last EF of a packet without a MAC takes at least 28 bytes.
MIN_LAST_EF_LENGTH = 28
#: RFC 7822: anything up to this long after the last EF is a legacy MAC.
MAX_MAC_LENGTH = 24
MIN_UNIQUE_ID_LENGTH = 32
#: A nonce shorter than this is padded up to it (RFC 8915 section 5.6).
MIN_NONCE_LENGTH = 16
SIV_TAG_LENGTH = 16
#: Most cookies one reply carries: as many as NTS-KE hands out.
MAX_COOKIES = 8

_EF_HEADER = struct.Struct("!HH")
_AUTH_HEADER = struct.Struct("!HH")


class ExtensionError(ValueError):
    """Extension fields that are malformed, or NTS fields that break RFC 8915."""


@dataclass(frozen=True, slots=True)
class ExtensionField:
    """One EF: its type, where it starts, its whole length, its (padded) body."""

    type: int
    offset: int
    length: int
    body: bytes


def _padded(length: int) -> int:
    return (length + 3) & ~3


def encode_field(ef_type: int, body: bytes, min_length: int = MIN_EF_LENGTH) -> bytes:
    """An EF: header, *body*, zero padding to 4 bytes and to *min_length*."""
    length = max(_padded(4 + len(body)), _padded(min_length))
    if length > 0xFFFF:
        raise ValueError(f"extension field body of {len(body)} bytes is too long")
    return _EF_HEADER.pack(ef_type, length) + body.ljust(length - 4, b"\0")


def parse_fields(
    data: bytes, start: int = HEADER_LENGTH, *, min_length: int = MIN_EF_LENGTH
) -> tuple[list[ExtensionField], int]:
    """The EFs of *data* from *start*, and where they end.

    Stops at the end of *data* or before a trailing legacy MAC (at most 24
    bytes, RFC 7822), so ``end < len(data)`` means a MAC follows. Raises
    :class:`ExtensionError` for a length that is short, unaligned or runs
    past the data.
    """
    fields: list[ExtensionField] = []
    size = len(data)
    offset = start
    while offset < size:
        if min_length >= MIN_EF_LENGTH and size - offset <= MAX_MAC_LENGTH:
            break
        if size - offset < 4:
            raise ExtensionError(f"{size - offset} stray bytes after the fields")
        ef_type, length = _EF_HEADER.unpack_from(data, offset)
        if length < max(min_length, 4) or length % 4 or offset + length > size:
            raise ExtensionError(
                f"extension field type {ef_type:#06x} at {offset} has bad length "
                f"{length}"
            )
        fields.append(
            ExtensionField(ef_type, offset, length, data[offset + 4 : offset + length])
        )
        offset += length
    return fields, offset


@dataclass(frozen=True, slots=True)
class Authenticator:
    """An NTS Authenticator EF: where it starts (the end of the associated
    data), the nonce and the ciphertext (SIV tag first)."""

    offset: int
    nonce: bytes
    ciphertext: bytes


def parse_authenticator(field: ExtensionField) -> Authenticator:
    if field.type != AUTHENTICATOR:
        raise ExtensionError(f"field type {field.type:#06x} is not an authenticator")
    body = _EF_HEADER.pack(field.type, field.length) + field.body
    nonce_length, ciphertext_start, ciphertext_length = authenticator_parts(
        body, 0, len(body)
    )
    return Authenticator(
        field.offset,
        body[8 : 8 + nonce_length],
        body[ciphertext_start : ciphertext_start + ciphertext_length],
    )


def authenticator_parts(packet: bytes, start: int, end: int) -> tuple[int, int, int]:
    """Nonce length, ciphertext start and length of the Authenticator EF at
    *start*..*end* of *packet* (the nonce starts at ``start + 8``).

    Raises :class:`ExtensionError` when they do not fit the field, or the
    nonce is empty or the ciphertext shorter than the SIV tag.
    """
    if end - start < 4 + _AUTH_HEADER.size:
        raise ExtensionError("authenticator too short for its lengths")
    nonce_length, ciphertext_length = _AUTH_HEADER.unpack_from(packet, start + 4)
    if nonce_length < 1 or ciphertext_length < SIV_TAG_LENGTH:
        raise ExtensionError(
            f"authenticator nonce {nonce_length} / ciphertext {ciphertext_length} bytes"
        )
    nonce_space = max(_padded(nonce_length), MIN_NONCE_LENGTH)
    if 8 + nonce_space + _padded(ciphertext_length) > end - start:
        raise ExtensionError("authenticator nonce and ciphertext overrun the field")
    return nonce_length, start + 8 + _padded(nonce_length), ciphertext_length


def encode_authenticator(
    siv: AESSIV,
    associated: bytes,
    plaintext: bytes,
    nonce: bytes,
    *,
    min_length: int = MIN_LAST_EF_LENGTH,
) -> bytes:
    """The Authenticator EF sealing *plaintext* over *associated* with *nonce*.

    *min_length* pads the field (additional padding) up to that many bytes,
    which is how a reply is made exactly as long as its request.
    """
    ciphertext = siv.encrypt(plaintext, [associated, nonce])
    body = (
        _AUTH_HEADER.pack(len(nonce), len(ciphertext))
        + nonce.ljust(_padded(len(nonce)), b"\0")
        + ciphertext
    )
    # A nonce under 16 bytes is made up for by additional padding at the end.
    least = authenticator_length(len(nonce), len(plaintext))
    return encode_field(AUTHENTICATOR, body, max(min_length, least))


def authenticator_length(nonce_length: int, plaintext_length: int) -> int:
    """Bytes of an unpadded Authenticator EF for these lengths."""
    return max(
        4
        + _AUTH_HEADER.size
        + max(_padded(nonce_length), MIN_NONCE_LENGTH)
        + _padded(SIV_TAG_LENGTH + plaintext_length),
        MIN_LAST_EF_LENGTH,
    )


def open_authenticator(siv: AESSIV, packet: bytes, auth: Authenticator) -> bytes | None:
    """The plaintext of *auth* in *packet*, or ``None`` if it does not verify."""
    try:
        return siv.decrypt(auth.ciphertext, [packet[: auth.offset], auth.nonce])
    except InvalidTag:
        return None


#: Where the NTS fields of a request are, as :func:`scan_request` finds them:
#: (Unique Identifier start, end; NTS Cookie start, end; Cookie Placeholders
#: outside the authenticator; Authenticator start, end). Starts are those of
#: the whole field (type and length included); the cookie and authenticator
#: starts are -1 for a Unique Identifier on its own.
Layout = tuple[int, int, int, int, int, int, int]

_unpack_ef = _EF_HEADER.unpack_from


def scan_request(packet: bytes, start: int = HEADER_LENGTH) -> Layout | None:
    """Where the NTS fields of a client request are; ``None`` if it has none.

    One pass over the extension fields with ``struct``, no objects: this is
    the datagram path. RFC 8915 section 5.7 and 5.3 decide what is accepted:

    * a complete NTS request: exactly one Unique Identifier (at least 32
      bytes), one NTS Cookie and one NTS Authenticator, placeholders as long
      as the cookie, other fields anywhere;
    * a Unique Identifier on its own, without NTS (section 5.3): its reply
      echoes it;
    * fields after the Authenticator are unauthenticated: the server
      discards them (section 5.7), unless they are NTS fields, which make
      the request invalid, as do bytes after the last field (a legacy MAC).

    Raises :class:`ExtensionError` for anything else that holds an NTS
    field; fields that do not parse make the request plain NTP as long as no
    NTS field came before (a legacy MAC or another protocol's bytes).
    """
    size = len(packet)
    offset = start
    uid = cookie = auth = -1
    uid_end = cookie_end = auth_end = 0
    placeholders = 0
    placeholder_length = 0
    seen = False
    while offset < size:
        left = size - offset
        if left <= MAX_MAC_LENGTH:
            break
        ef_type, length = _unpack_ef(packet, offset)
        nts = ef_type in NTS_TYPES
        if length < MIN_EF_LENGTH or length & 3 or length > left:
            if seen or nts:
                raise ExtensionError(
                    f"extension field type {ef_type:#06x} at {offset} has bad "
                    f"length {length}"
                )
            return None
        if nts:
            seen = True
            if auth >= 0:
                raise ExtensionError("NTS field after the authenticator")
            if ef_type == UNIQUE_IDENTIFIER:
                if uid >= 0:
                    raise ExtensionError("two Unique Identifier fields")
                if length - 4 < MIN_UNIQUE_ID_LENGTH:
                    raise ExtensionError("Unique Identifier shorter than 32 bytes")
                uid, uid_end = offset, offset + length
            elif ef_type == NTS_COOKIE:
                if cookie >= 0:
                    raise ExtensionError("two NTS Cookie fields")
                cookie, cookie_end = offset, offset + length
            elif ef_type == COOKIE_PLACEHOLDER:
                if placeholders and length != placeholder_length:
                    raise ExtensionError("cookie placeholders of different lengths")
                placeholders += 1
                placeholder_length = length
            else:
                auth, auth_end = offset, offset + length
        offset += length
    if not seen:
        return None
    if uid < 0:
        raise ExtensionError("NTS fields without a Unique Identifier")
    if cookie < 0 and auth < 0 and not placeholders:
        return uid, uid_end, -1, 0, 0, -1, 0
    if cookie < 0 or auth < 0:
        raise ExtensionError(
            "an NTS request needs a Unique Identifier, Cookie and Authenticator"
        )
    if offset != size:
        raise ExtensionError("bytes after the last extension field")
    if placeholders and placeholder_length != cookie_end - cookie:
        raise ExtensionError("a cookie placeholder is not as long as the cookie")
    return uid, uid_end, cookie, cookie_end, placeholders, auth, auth_end


@dataclass(frozen=True, slots=True)
class NtsRequest:
    """The NTS fields of a client request, checked for form but not verified.

    A Unique Identifier on its own (no NTS, RFC 8915 section 5.3) has an
    empty cookie and no authenticator.
    """

    unique_id: bytes
    cookie: bytes
    #: Placeholders outside the authenticator (more may be encrypted in it).
    placeholders: int
    authenticator: Authenticator | None


def parse_nts_request(packet: bytes) -> NtsRequest | None:
    """The NTS request in *packet*, ``None`` if it has no NTS fields at all.

    :func:`scan_request` as objects (for clients, tests and tools). Raises
    :class:`ExtensionError` for an NTS request a server must not answer.
    """
    layout = scan_request(packet)
    if layout is None:
        return None
    uid, uid_end, cookie, cookie_end, placeholders, auth, auth_end = layout
    unique_id = packet[uid + 4 : uid_end]
    if auth < 0:
        return NtsRequest(unique_id, b"", 0, None)
    field = ExtensionField(
        AUTHENTICATOR, auth, auth_end - auth, packet[auth + 4 : auth_end]
    )
    return NtsRequest(
        unique_id,
        packet[cookie + 4 : cookie_end],
        placeholders,
        parse_authenticator(field),
    )


def encrypted_placeholders(plaintext: bytes, cookie_length: int) -> int:
    """Cookie Placeholders inside an authenticator's plaintext.

    Raises :class:`ExtensionError` when the plaintext is not a sequence of
    EFs or holds a placeholder of another length than the cookie.
    """
    fields, _ = parse_fields(plaintext, 0, min_length=4)
    count = 0
    for field in fields:
        if field.type == COOKIE_PLACEHOLDER:
            if len(field.body) != cookie_length:
                raise ExtensionError(
                    "a cookie placeholder is not as long as the cookie"
                )
            count += 1
    return count


def cookie_field_length(cookie_length: int) -> int:
    return max(_padded(4 + cookie_length), MIN_EF_LENGTH)


def cookies_that_fit(
    request_length: int, unique_id_length: int, cookie_length: int, wanted: int
) -> int:
    """How many of *wanted* new cookies a reply no larger than its request holds."""
    fixed = HEADER_LENGTH + cookie_field_length(unique_id_length)
    each = cookie_field_length(cookie_length)
    n = min(wanted, MAX_COOKIES)
    while n > 0 and fixed + authenticator_length(MIN_NONCE_LENGTH, n * each) > (
        request_length
    ):
        n -= 1
    return n


def build_response(
    header: bytes,
    unique_id: bytes,
    s2c: AESSIV,
    cookies: Iterable[bytes],
    nonce: bytes,
    *,
    length: int = 0,
) -> bytes:
    """An authenticated NTS reply: header, Unique Identifier, Authenticator
    holding the new cookies, padded up to *length* bytes when that is more."""
    prefix = header + encode_field(UNIQUE_IDENTIFIER, unique_id)
    plaintext = b"".join(encode_field(NTS_COOKIE, cookie) for cookie in cookies)
    return prefix + encode_authenticator(
        s2c,
        prefix,
        plaintext,
        nonce,
        min_length=max(length - len(prefix), MIN_LAST_EF_LENGTH),
    )


def build_nak(kiss: bytes, unique_id: bytes) -> bytes:
    """An NTS NAK: the NTSN kiss and the request's Unique Identifier, unauthenticated."""
    return kiss + encode_field(UNIQUE_IDENTIFIER, unique_id, MIN_LAST_EF_LENGTH)


# -- the client side (tests, benchmarks) -------------------------------------


def build_request(
    header: bytes,
    unique_id: bytes,
    cookie: bytes,
    c2s: AESSIV,
    nonce: bytes,
    *,
    placeholders: int = 0,
    encrypted_placeholders: int = 0,
    extra: Sequence[bytes] = (),
) -> bytes:
    """A client's NTS request: *extra* are further EFs put before the NTS ones."""
    parts = [header, *extra, encode_field(UNIQUE_IDENTIFIER, unique_id)]
    parts.append(encode_field(NTS_COOKIE, cookie))
    parts.extend(
        encode_field(COOKIE_PLACEHOLDER, bytes(len(cookie)))
        for _ in range(placeholders)
    )
    associated = b"".join(parts)
    plaintext = b"".join(
        encode_field(COOKIE_PLACEHOLDER, bytes(len(cookie)))
        for _ in range(encrypted_placeholders)
    )
    return associated + encode_authenticator(c2s, associated, plaintext, nonce)


@dataclass(frozen=True, slots=True)
class NtsReply:
    """What a client takes from a reply."""

    header: bytes
    #: ``True`` for an NTS NAK (kiss ``NTSN``, Unique Identifier, no authenticator).
    nak: bool
    cookies: tuple[bytes, ...]


def open_response(packet: bytes, s2c: AESSIV, unique_id: bytes) -> NtsReply:
    """Check a reply as a client does; :class:`ExtensionError` when it fails."""
    if len(packet) < HEADER_LENGTH:
        raise ExtensionError("shorter than an NTP header")
    fields, end = parse_fields(packet)
    ids = [f for f in fields if f.type == UNIQUE_IDENTIFIER]
    echoed = encode_field(UNIQUE_IDENTIFIER, unique_id)[4:]
    if len(ids) != 1 or ids[0].body != echoed:
        raise ExtensionError("the reply does not echo our Unique Identifier")
    auths = [f for f in fields if f.type == AUTHENTICATOR]
    header = packet[:HEADER_LENGTH]
    if not auths:
        if header[1] == 0 and header[12:16] == b"NTSN":
            return NtsReply(header, True, ())
        raise ExtensionError("no authenticator in the reply")
    if len(auths) != 1 or auths[0] is not fields[-1] or end != len(packet):
        raise ExtensionError("the authenticator is not the one last field")
    plaintext = open_authenticator(s2c, packet, parse_authenticator(auths[0]))
    if plaintext is None:
        raise ExtensionError("the reply does not authenticate")
    inner, _ = parse_fields(plaintext, 0, min_length=4)
    return NtsReply(header, False, tuple(f.body for f in inner if f.type == NTS_COOKIE))
