"""NTS-KE records (RFC 8915 section 4): encode and parse, pure.

A record is a critical bit and a 15-bit type in 16 bits, a 16-bit body
length, then the body. A message is a sequence of records ending with End of
Message. Parsing is incremental: :func:`parse_message` says "not complete
yet" (``None``) until the End of Message record has arrived, and raises
:class:`RecordError` for bytes that can never become a valid message.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

# Record types (RFC 8915 section 7.6, "NTS Key Establishment Record Types").
END_OF_MESSAGE = 0
NEXT_PROTOCOL = 1
ERROR = 2
WARNING = 3
AEAD_ALGORITHM = 4
NEW_COOKIE = 5
NTPV4_SERVER = 6
NTPV4_PORT = 7

RECORD_NAMES = {
    END_OF_MESSAGE: "End of Message",
    NEXT_PROTOCOL: "NTS Next Protocol Negotiation",
    ERROR: "Error",
    WARNING: "Warning",
    AEAD_ALGORITHM: "AEAD Algorithm Negotiation",
    NEW_COOKIE: "New Cookie for NTPv4",
    NTPV4_SERVER: "NTPv4 Server Negotiation",
    NTPV4_PORT: "NTPv4 Port Negotiation",
}

#: NTS Next Protocol ids.
PROTOCOL_NTPV4 = 0
#: AEAD algorithm ids (IANA "AEAD Algorithms"): the one every NTS peer has.
AEAD_AES_SIV_CMAC_256 = 15

# Error codes (RFC 8915 section 7.7).
ERROR_UNRECOGNIZED_CRITICAL = 0
ERROR_BAD_REQUEST = 1
ERROR_INTERNAL = 2

_HEADER = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_CRITICAL = 0x8000
MAX_TYPE = 0x7FFF
MAX_BODY = 0xFFFF


class RecordError(ValueError):
    """Bytes that are not, and cannot become, a well-formed NTS-KE message."""


@dataclass(frozen=True, slots=True)
class Record:
    """One NTS-KE record."""

    type: int
    body: bytes = b""
    critical: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.type <= MAX_TYPE:
            raise ValueError(f"record type must be 0..{MAX_TYPE}, not {self.type}")
        if len(self.body) > MAX_BODY:
            raise ValueError(f"record body of {len(self.body)} bytes is too long")

    def encode(self) -> bytes:
        flags = _CRITICAL if self.critical else 0
        return _HEADER.pack(flags | self.type, len(self.body)) + self.body

    @property
    def name(self) -> str:
        return RECORD_NAMES.get(self.type, f"type {self.type}")


def encode_records(records: Iterable[Record]) -> bytes:
    return b"".join(record.encode() for record in records)


def parse_message(data: bytes) -> tuple[list[Record], int] | None:
    """The records of the message at the start of *data*, through End of Message.

    Returns the records (End of Message included, last) and the bytes they
    took, or ``None`` while the message is incomplete. An End of Message
    record with a body, or without its critical bit, raises
    :class:`RecordError`: RFC 8915 requires both.
    """
    records: list[Record] = []
    offset = 0
    size = len(data)
    while size - offset >= _HEADER.size:
        first, length = _HEADER.unpack_from(data, offset)
        end = offset + _HEADER.size + length
        if end > size:
            return None
        record = Record(
            first & MAX_TYPE,
            bytes(data[offset + _HEADER.size : end]),
            bool(first & _CRITICAL),
        )
        records.append(record)
        offset = end
        if record.type == END_OF_MESSAGE:
            if record.body:
                raise RecordError("End of Message record has a body")
            if not record.critical:
                raise RecordError("End of Message record lacks the critical bit")
            return records, offset
    return None


def u16_list(body: bytes) -> list[int]:
    """A record body read as big-endian 16-bit values (protocol, AEAD ids)."""
    if len(body) % 2:
        raise RecordError(f"body of {len(body)} bytes is not a list of 16-bit values")
    return [value for (value,) in _U16.iter_unpack(body)]


def u16(value: int) -> bytes:
    return _U16.pack(value)


def end_of_message() -> Record:
    return Record(END_OF_MESSAGE, b"", critical=True)


def next_protocol(protocols: Iterable[int]) -> Record:
    return Record(NEXT_PROTOCOL, b"".join(map(u16, protocols)), critical=True)


def aead_algorithm(algorithms: Iterable[int], *, critical: bool = True) -> Record:
    return Record(AEAD_ALGORITHM, b"".join(map(u16, algorithms)), critical=critical)


def error(code: int) -> Record:
    return Record(ERROR, u16(code), critical=True)


def warning(code: int) -> Record:
    return Record(WARNING, u16(code), critical=True)


def new_cookie(cookie: bytes) -> Record:
    return Record(NEW_COOKIE, cookie)


def ntpv4_server(name: str) -> Record:
    return Record(NTPV4_SERVER, name.encode("ascii"), critical=True)


def ntpv4_port(port: int) -> Record:
    return Record(NTPV4_PORT, u16(port), critical=True)
