"""Roughtime (RFC 10049) on the wire: tag-value messages, packets, requests
and responses. Pure: bytes in, values out, no I/O and no clock.

A message is a map of 4-byte tags to values (section 4): a uint32 count N,
N-1 uint32 offsets, N uint32 tags, then the values; everything little-endian,
tags sorted ascending by their uint32 value and unique, offsets multiples of
four and non-decreasing. A packet (section 5) frames one message as
``"ROUGHTIM" || uint32 length || message``.

Only version 1 is spoken. Published RFC 10049 differs from the last draft
(draft-ietf-ntp-roughtime-19, test version 0x8000000c) in one wire detail:
the signature context strings are spelled ``Roughtime`` where the drafts
(and Google's original protocol) spell ``RoughTime``. Appendix B's example
report still carries draft-era signatures; see :data:`DRAFT_RESPONSE_CONTEXT`.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAGIC = b"ROUGHTIM"
_FRAME = struct.Struct("<8sI")
FRAME_SIZE = _FRAME.size

#: IANA port for Roughtime over UDP and TCP (RFC 10049 section 12.1).
DEFAULT_PORT = 5319

VERSION_1 = 0x00000001
#: Drafts used 0x80000000 + draft number on the wire; drafts 12-19 all sent
#: 0x8000000c (with ``RoughTime`` contexts), drafts 8-11 0x80000008-0x8000000b.
#: The RFC reserves 0x80000000-0xbfffffff for experimental use.
DRAFT_VERSION_BASE = 0x80000000
DRAFT_12_TO_19 = 0x8000000C
SUPPORTED_VERSIONS = (VERSION_1,)

#: Requests (the whole packet) shorter than this are not answered; our own
#: requests pad the *message* to it, which satisfies either reading of
#: section 5.1 (some clients pad the packet, others the message).
MIN_REQUEST_SIZE = 1024
NONCE_SIZE = 32
HASH_SIZE = 32
SIGNATURE_SIZE = 64
PUBLIC_KEY_SIZE = 32
MAX_VERSIONS = 32
MAX_PATH_HASHES = 32

TYPE_REQUEST = 0
TYPE_RESPONSE = 1

#: Context strings, terminating zero included (sections 5.2.1 and 5.2.6).
RESPONSE_CONTEXT = b"Roughtime v1 response signature\x00"
DELEGATION_CONTEXT = b"Roughtime v1 delegation signature\x00"
#: The spelling of draft-ietf-ntp-roughtime-12..19 (version 0x8000000c);
#: kept only to check the RFC's Appendix B vectors, never used to sign.
DRAFT_RESPONSE_CONTEXT = b"RoughTime v1 response signature\x00"
DRAFT_DELEGATION_CONTEXT = b"RoughTime v1 delegation signature\x00"

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class WireError(ValueError):
    """Bytes that are not a well-formed Roughtime message, packet or reply."""


class RequestError(WireError):
    """A datagram that is not an answerable Roughtime request."""


class RequestTooSmall(RequestError):
    """A request shorter than :data:`MIN_REQUEST_SIZE` (amplification guard)."""


def tag(name: str) -> int:
    """The uint32 of a tag: one to four capital letters, zero-padded."""
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= 4 or not all(0x41 <= b <= 0x5A for b in raw):
        raise ValueError(f"not a Roughtime tag name: {name!r}")
    return int.from_bytes(raw.ljust(4, b"\x00"), "little")


def tag_name(value: int) -> str:
    """A tag's printable name (unknown bytes escaped)."""
    raw = value.to_bytes(4, "little").rstrip(b"\x00")
    return raw.decode("ascii", "backslashreplace")


SIG = tag("SIG")
VER = tag("VER")
SRV = tag("SRV")
NONC = tag("NONC")
DELE = tag("DELE")
TYPE = tag("TYPE")
PATH = tag("PATH")
RADI = tag("RADI")
PUBK = tag("PUBK")
MIDP = tag("MIDP")
SREP = tag("SREP")
VERS = tag("VERS")
MINT = tag("MINT")
ROOT = tag("ROOT")
CERT = tag("CERT")
MAXT = tag("MAXT")
INDX = tag("INDX")
ZZZZ = tag("ZZZZ")


def digest(data: bytes) -> bytes:
    """``H``: SHA-512 truncated to 32 bytes (sections 5.1.4 and 5.3.1)."""
    return hashlib.sha512(data).digest()[:HASH_SIZE]


def srv_value(public_key: bytes) -> bytes:
    """The SRV tag naming a long-term key: ``H(0xff || public_key)``."""
    return digest(b"\xff" + public_key)


def u32(value: int) -> bytes:
    return _U32.pack(value)


def u64(value: int) -> bytes:
    return _U64.pack(value)


def read_u32(value: bytes, name: str = "value") -> int:
    if len(value) != 4:
        raise WireError(f"{name} is {len(value)} bytes, not 4")
    result: int = _U32.unpack(value)[0]
    return result


def read_u64(value: bytes, name: str = "value") -> int:
    if len(value) != 8:
        raise WireError(f"{name} is {len(value)} bytes, not 8")
    result: int = _U64.unpack(value)[0]
    return result


def read_u32_list(value: bytes, name: str = "value") -> tuple[int, ...]:
    if len(value) % 4:
        raise WireError(f"{name} is {len(value)} bytes, not a multiple of 4")
    return struct.unpack(f"<{len(value) // 4}I", value)


def encode_message(pairs: Mapping[int, bytes]) -> bytes:
    """A message holding *pairs*, sorted by tag.

    Every value but the last must be a multiple of 4 bytes long, since the
    offsets that follow it must be.
    """
    if not pairs:
        raise ValueError("a Roughtime message has at least one pair")
    tags = sorted(pairs)
    values = [pairs[t] for t in tags]
    offsets = []
    position = 0
    for value in values[:-1]:
        position += len(value)
        if position % 4:
            raise ValueError("values before the last must be multiples of 4 bytes")
        offsets.append(position)
    count = len(tags)
    header = struct.pack(f"<I{count - 1}I{count}I", count, *offsets, *tags)
    return header + b"".join(values)


def decode_message(data: bytes) -> dict[int, bytes]:
    """The pairs of one message; :class:`WireError` unless it is well formed."""
    size = len(data)
    if size < 4:
        raise WireError("message shorter than its pair count")
    count = _U32.unpack_from(data)[0]
    if count == 0:
        raise WireError("message with no pairs")
    header = 8 * count
    if header > size:
        raise WireError(f"{count} pairs do not fit in {size} bytes")
    fields = struct.unpack_from(f"<{2 * count - 1}I", data, 4)
    offsets = (0, *fields[: count - 1])
    tags = fields[count - 1 :]
    body = size - header
    previous_tag = -1
    for i in range(count):
        if tags[i] <= previous_tag:
            raise WireError("tags not strictly ascending")
        previous_tag = tags[i]
    for i in range(1, count):
        offset = offsets[i]
        if offset % 4 or offset < offsets[i - 1] or offset > body:
            raise WireError(f"bad offset {offset} for tag {tag_name(tags[i])}")
    ends = (*offsets[1:], body)
    return {tags[i]: data[header + offsets[i] : header + ends[i]] for i in range(count)}


def encode_packet(message: bytes) -> bytes:
    return _FRAME.pack(MAGIC, len(message)) + message


def decode_packet(data: bytes) -> bytes:
    """The message a packet frames; the length must match the datagram."""
    if len(data) < FRAME_SIZE:
        raise WireError("shorter than the ROUGHTIM frame")
    magic, length = _FRAME.unpack_from(data)
    if magic != MAGIC:
        raise WireError("no ROUGHTIM magic")
    if length != len(data) - FRAME_SIZE:
        raise WireError(f"frame says {length} bytes, {len(data) - FRAME_SIZE} follow")
    return data[FRAME_SIZE:]


@dataclass(frozen=True, slots=True)
class Request:
    """An answerable request: the whole packet is the Merkle leaf."""

    packet: bytes
    nonce: bytes
    versions: tuple[int, ...]
    srv: bytes | None


def parse_request(datagram: bytes, *, min_size: int = MIN_REQUEST_SIZE) -> Request:
    """The request in *datagram*, or :class:`RequestError` (and nothing else).

    Section 5.1: VER, NONC and TYPE = 0 are required; SRV is optional;
    every other tag (ZZZZ, grease) is ignored.
    """
    if len(datagram) < min_size:
        raise RequestTooSmall(f"request of {len(datagram)} bytes")
    try:
        pairs = decode_message(decode_packet(datagram))
    except WireError as e:
        raise RequestError(str(e)) from None
    try:
        versions = read_u32_list(pairs[VER], "VER")
        nonce = pairs[NONC]
        kind = read_u32(pairs[TYPE], "TYPE")
    except KeyError as e:
        raise RequestError(f"no {tag_name(e.args[0])} tag") from None
    except WireError as e:
        raise RequestError(str(e)) from None
    if kind != TYPE_REQUEST:
        raise RequestError(f"TYPE {kind} in a request")
    if not 1 <= len(versions) <= MAX_VERSIONS:
        raise RequestError(f"{len(versions)} versions in VER")
    if len(nonce) != NONCE_SIZE:
        raise RequestError(f"NONC of {len(nonce)} bytes")
    srv = pairs.get(SRV)
    if srv is not None and len(srv) != HASH_SIZE:
        raise RequestError(f"SRV of {len(srv)} bytes")
    return Request(datagram, nonce, versions, srv)


def encode_request(
    nonce: bytes,
    *,
    versions: Iterable[int] = SUPPORTED_VERSIONS,
    srv: bytes | None = None,
    size: int = MIN_REQUEST_SIZE,
) -> bytes:
    """A request packet whose message is padded with ZZZZ to *size* bytes."""
    if len(nonce) != NONCE_SIZE:
        raise ValueError("the nonce is 32 bytes")
    pairs = {
        VER: b"".join(u32(v) for v in sorted(set(versions))),
        NONC: nonce,
        TYPE: u32(TYPE_REQUEST),
    }
    if srv is not None:
        pairs[SRV] = srv
    # The header grows by 8 bytes with ZZZZ: one offset and one tag.
    unpadded = len(encode_message(pairs)) + 8
    pairs[ZZZZ] = bytes(max(0, size - unpadded))
    return encode_packet(encode_message(pairs))


def encode_srep(
    *, version: int, radius: int, midpoint: int, versions: Iterable[int], root: bytes
) -> bytes:
    """The signed part of a response (section 5.2.5)."""
    return encode_message(
        {
            VER: u32(version),
            RADI: u32(radius),
            MIDP: u64(midpoint),
            VERS: b"".join(u32(v) for v in sorted(versions)),
            ROOT: root,
        }
    )


def encode_dele(public_key: bytes, mint: int, maxt: int) -> bytes:
    """The delegation a long-term key signs (section 5.2.6)."""
    return encode_message({PUBK: public_key, MINT: u64(mint), MAXT: u64(maxt)})


def encode_cert(dele: bytes, signature: bytes) -> bytes:
    return encode_message({SIG: signature, DELE: dele})


def encode_response(
    *,
    signature: bytes,
    nonce: bytes,
    path: bytes,
    srep: bytes,
    cert: bytes,
    index: int,
) -> bytes:
    """A response packet (section 5.2, figure 3)."""
    return encode_packet(
        encode_message(
            {
                SIG: signature,
                NONC: nonce,
                TYPE: u32(TYPE_RESPONSE),
                PATH: path,
                SREP: srep,
                CERT: cert,
                INDX: u32(index),
            }
        )
    )


def response_size(path_hashes: int, versions: int = len(SUPPORTED_VERSIONS)) -> int:
    """The packet size of one of our responses with that many PATH hashes."""
    return 416 + HASH_SIZE * path_hashes + 4 * (versions - 1)


@dataclass(frozen=True, slots=True)
class Response:
    """A response taken apart; the raw SREP and DELE are what was signed."""

    signature: bytes
    nonce: bytes
    path: tuple[bytes, ...]
    index: int
    srep: bytes
    version: int
    versions: tuple[int, ...]
    radius: int
    midpoint: int
    root: bytes
    cert_signature: bytes
    dele: bytes
    public_key: bytes
    mint: int
    maxt: int


def _sized(pairs: Mapping[int, bytes], which: int, size: int) -> bytes:
    try:
        value = pairs[which]
    except KeyError:
        raise WireError(f"no {tag_name(which)} tag") from None
    if len(value) != size:
        raise WireError(f"{tag_name(which)} is {len(value)} bytes, not {size}")
    return value


def _required(pairs: Mapping[int, bytes], which: int) -> bytes:
    try:
        return pairs[which]
    except KeyError:
        raise WireError(f"no {tag_name(which)} tag") from None


def parse_response(packet: bytes) -> Response:
    """A response's fields, checked for shape only (no signatures)."""
    top = decode_message(decode_packet(packet))
    kind = read_u32(_required(top, TYPE), "TYPE")
    if kind != TYPE_RESPONSE:
        raise WireError(f"TYPE {kind} in a response")
    raw_path = _required(top, PATH)
    if len(raw_path) % HASH_SIZE or len(raw_path) > HASH_SIZE * MAX_PATH_HASHES:
        raise WireError(f"PATH of {len(raw_path)} bytes")
    path = tuple(
        raw_path[i : i + HASH_SIZE] for i in range(0, len(raw_path), HASH_SIZE)
    )
    srep_raw = _required(top, SREP)
    srep = decode_message(srep_raw)
    cert = decode_message(_required(top, CERT))
    dele_raw = _required(cert, DELE)
    dele = decode_message(dele_raw)
    versions = read_u32_list(_required(srep, VERS), "VERS")
    if not 1 <= len(versions) <= MAX_VERSIONS or list(versions) != sorted(
        set(versions)
    ):
        raise WireError("VERS not 1-32 ascending unique versions")
    return Response(
        signature=_sized(top, SIG, SIGNATURE_SIZE),
        nonce=_sized(top, NONC, NONCE_SIZE),
        path=path,
        index=read_u32(_required(top, INDX), "INDX"),
        srep=srep_raw,
        version=read_u32(_required(srep, VER), "VER"),
        versions=versions,
        radius=read_u32(_required(srep, RADI), "RADI"),
        midpoint=read_u64(_required(srep, MIDP), "MIDP"),
        root=_sized(srep, ROOT, HASH_SIZE),
        cert_signature=_sized(cert, SIG, SIGNATURE_SIZE),
        dele=dele_raw,
        public_key=_sized(dele, PUBK, PUBLIC_KEY_SIZE),
        mint=read_u64(_required(dele, MINT), "MINT"),
        maxt=read_u64(_required(dele, MAXT), "MAXT"),
    )
