"""NTPv4 server mode (RFC 5905), which also answers SNTP (RFC 4330) clients.

Pure wire code: bytes in, bytes out; no clock read, no kernel, no registry.
The clock discipline the replies advertise is a ``ServerState`` value (made
from the kernel's by ``udptime.clockstate``), the receive and transmit stamps
come from the caller, and the responder is ``udptime.responders.ntp``. Timestamps stay 64-bit NTP fixed point or integers
wherever possible so that stamps the server copies are bit-exact.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from math import floor

from udptime.formats import EPOCH_1900_TO_1970

#: 2**32: one NTP era in seconds, and the scale of a timestamp's fraction.
ERA_SECONDS = 1 << 32
_MASK64 = (1 << 64) - 1
_NS_PER_S = 1_000_000_000
_EPOCH_NS = EPOCH_1900_TO_1970 * _NS_PER_S
_HALF_NS = _NS_PER_S // 2
_SCALE = float(ERA_SECONDS)
_EPOCH_FIXED = EPOCH_1900_TO_1970 << 32

#: RFC 5905 poll exponent bounds (log2 seconds) for the poll field of replies.
MIN_POLL = 4
MAX_POLL = 17

#: Leap indicator values.
LEAP_NONE = 0
LEAP_INSERT = 1
LEAP_DELETE = 2
LEAP_UNSYNCHRONISED = 3

MODE_CLIENT = 3
MODE_SERVER = 4
PACKET_SIZE = 48
ZERO_TIMESTAMP = bytes(8)

#: Header byte 1 to 23 of a reply apart from stratum and poll: precision, root
#: delay, root dispersion, reference id, reference time.
_MIDDLE = struct.Struct("!bII4s8s")
_REPLY = struct.Struct("!BBb21s8s8s8s")
#: A reply from a prebuilt 24-byte head (``ReplyHeads``), origin, receive and
#: transmit stamps as 64-bit integers; and with the transmit left zero, for a
#: late stamp written just before the send.
REPLY_FROM_HEAD = struct.Struct("!24s8sQQ")
REPLY_UNSTAMPED = struct.Struct("!24s8sQ8x")
_KISS = struct.Struct("!BBbbII4s8s8s8s8s")


def _fixed_from_posix(posix_seconds: float) -> int:
    """Unbounded NTP 32.32 fixed point, rounded half up to 2**-32 s.

    Every step is exact: scaling a float by 2**32 only moves its exponent,
    ``floor`` of a float is an exact int, and the remainder is representable.
    """
    scaled = posix_seconds * _SCALE
    fixed = floor(scaled)
    if scaled - fixed >= 0.5:
        fixed += 1
    return fixed + _EPOCH_FIXED


def to_ntp(posix_seconds: float) -> bytes:
    """The 8-byte NTP timestamp of a POSIX time, era folded away (mod 2**64).

    Rounds to the nearest 2**-32 s, as ``ntp_from_ns`` does; ``ValueError`` or
    ``OverflowError`` for NaN and infinities.
    """
    return (_fixed_from_posix(posix_seconds) & _MASK64).to_bytes(8, "big")


def fixed_from_ns(ns: int) -> int:
    """The 64-bit NTP timestamp of integer POSIX nanoseconds, as an integer.

    Rounded to the nearest 2**-32 s (half up), so ``ns_from_ntp`` gives the
    same nanosecond count back: a fraction step is under a quarter nanosecond.
    """
    return (((ns + _EPOCH_NS) << 32) + _HALF_NS) // _NS_PER_S & _MASK64


_STAMP_OFFSET = (_EPOCH_NS << 32) + _HALF_NS
_repeat = itertools.repeat


def fixed_from_ns_many(ns: Sequence[int]) -> list[int]:
    """:func:`fixed_from_ns` of each of *ns*, computed in C (``map`` passes).

    The same integer arithmetic, rearranged exactly:
    ``((ns + E) << 32) + H == (ns << 32) + ((E << 32) + H)``.
    """
    n = len(ns)
    scaled = map(
        operator.add,
        map(operator.lshift, ns, _repeat(32, n)),
        _repeat(_STAMP_OFFSET, n),
    )
    fixed = map(operator.floordiv, scaled, _repeat(_NS_PER_S, n))
    return list(map(operator.and_, fixed, _repeat(_MASK64, n)))


@functools.cache
def request_fields(n: int) -> struct.Struct:
    """Header byte 0, poll and transmit stamp of *n* 48-byte requests in a row."""
    return struct.Struct("B x B 37x 8s" * n)


@functools.cache
def unstamped_replies(n: int) -> struct.Struct:
    """*n* replies as :data:`REPLY_UNSTAMPED` packs them, back to back."""
    return struct.Struct("!" + "24s8sQ8x" * n)


@functools.cache
def split_packets(n: int) -> struct.Struct:
    """*n* 48-byte packets in a row, as *n* bytes objects."""
    return struct.Struct(f"{PACKET_SIZE}s" * n)


def ntp_from_ns(ns: int) -> bytes:
    """The NTP timestamp of integer POSIX nanoseconds (kernel ``SO_TIMESTAMPNS``)."""
    return fixed_from_ns(ns).to_bytes(8, "big")


def _unfold(raw: bytes, pivot_fixed: int) -> int:
    """The 32.32 fixed-point time (since 1900, any era) of *raw* nearest the pivot."""
    delta = (int.from_bytes(raw, "big") - pivot_fixed) & _MASK64
    if delta >= 1 << 63:
        delta -= 1 << 64
    return pivot_fixed + delta


def from_ntp(raw: bytes, pivot: float) -> float:
    """POSIX seconds of an NTP timestamp, in the era that puts it nearest *pivot*.

    A timestamp names an instant modulo 136 years; any pivot within 68 years of
    the truth (the server's own clock, say) resolves the era. Era 1 begins
    2036-02-07T06:28:16Z.
    """
    fixed = _unfold(raw, _fixed_from_posix(pivot))
    return (fixed - _EPOCH_FIXED) / ERA_SECONDS


def ns_from_ntp(raw: bytes, pivot_ns: int) -> int:
    """POSIX nanoseconds of an NTP timestamp nearest *pivot_ns*, rounded half up."""
    pivot_fixed = ((pivot_ns + _EPOCH_NS) << 32) // _NS_PER_S
    fixed = _unfold(raw, pivot_fixed)
    return (fixed * _NS_PER_S + (1 << 31) >> 32) - _EPOCH_NS


def short_format(seconds: float) -> int:
    """NTP short format (unsigned 16.16 seconds), clamped to what it can hold."""
    return min(max(int(seconds * 65_536 + 0.5), 0), 0xFFFF_FFFF)


def precision_exponent(seconds: float) -> int:
    """The NTP precision field for a clock resolution: ceil(log2), exact at powers of two."""
    if not seconds > 0:
        raise ValueError(f"resolution must be positive, not {seconds!r}")
    mantissa, exponent = math.frexp(seconds)
    result = exponent - 1 if mantissa == 0.5 else exponent
    return min(max(result, -128), 127)


def refid_from_text(text: str) -> bytes:
    """A reference id from an IPv4 address (stratum 2+) or up to 4 ASCII characters."""
    try:
        return ipaddress.IPv4Address(text).packed
    except ValueError:
        pass
    raw = text.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"reference id must be IPv4 or 1-4 ASCII characters: {text!r}")
    return raw.ljust(4, b"\0")


@dataclass(frozen=True, slots=True)
class Request:
    """The fields of a client request a server reply needs."""

    version: int
    poll: int
    #: The client's transmit timestamp exactly as sent, for the reply's origin.
    transmit: bytes


#: Header byte 0 of an NTPv1 request: version 1, mode field 0 (NTPv1 had no
#: mode; the ports told). chronyd and ntpd answer it as a client request.
_V1_REQUEST = 1 << 3


def _accepts(first: int) -> bool:
    """A client request in header byte 0: client mode and version 1-4, or NTPv1.

    Replies are always server mode (4), never mode 0, so answering an NTPv1
    packet cannot start a loop with another server.
    """
    if first & 0x07 == MODE_CLIENT:
        return 1 <= (first >> 3) & 0x07 <= 4
    return first & 0x3F == _V1_REQUEST


def _signed8(byte: int) -> int:
    return byte - 256 if byte >= 128 else byte


def parse_request(data: bytes) -> Request | None:
    """The request in *data*, or ``None`` for anything a server must ignore.

    Ignored: fewer than 48 bytes, modes other than client, versions 0 and 5-7.
    Extension fields and MACs after the header are not looked at.
    """
    if len(data) < PACKET_SIZE or not _accepts(data[0]):
        return None
    return Request((data[0] >> 3) & 0x07, _signed8(data[2]), data[40:48])


def _clamp_poll(poll: int, min_poll: int) -> int:
    return min(max(poll, min_poll), MAX_POLL)


def check_min_poll(min_poll: int) -> None:
    if not MIN_POLL <= min_poll <= MAX_POLL:
        raise ValueError(f"min_poll must be {MIN_POLL}..{MAX_POLL}, not {min_poll}")


@dataclass(frozen=True)
class ServerState:
    """What replies say about the server's clock; changes at most once a second.

    ``precision`` is log2 seconds; ``root_delay`` and ``root_dispersion`` are
    seconds; ``reference_time`` is POSIX seconds, ``None`` for never set.
    """

    leap: int
    stratum: int
    precision: int
    root_delay: float
    root_dispersion: float
    refid: bytes
    reference_time: float | None

    def __post_init__(self) -> None:
        # Checked once per state, so the per-datagram path cannot fail to pack.
        if not 0 <= self.leap <= 3:
            raise ValueError(f"leap indicator must be 0..3, not {self.leap}")
        if not 0 <= self.stratum <= 255:
            raise ValueError(f"stratum must be 0..255, not {self.stratum}")
        if not -128 <= self.precision <= 127:
            raise ValueError(f"precision must be -128..127, not {self.precision}")
        if len(self.refid) != 4:
            raise ValueError(f"reference id must be 4 bytes, not {self.refid!r}")
        for name in ("root_delay", "root_dispersion", "reference_time"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite, not {value!r}")

    def middle(self) -> bytes:
        """Reply bytes 3 to 23, which depend on this state alone."""
        reftime = (
            ZERO_TIMESTAMP
            if self.reference_time is None
            else to_ntp(self.reference_time)
        )
        return _MIDDLE.pack(
            self.precision,
            short_format(self.root_delay),
            short_format(self.root_dispersion),
            self.refid,
            reftime,
        )


_last_middle: tuple[ServerState | None, bytes] = (None, b"")


def _middle_of(state: ServerState) -> bytes:
    """``state.middle()``, remembered for the last state seen."""
    global _last_middle
    seen, middle = _last_middle
    if state is not seen:
        middle = state.middle()
        _last_middle = (state, middle)
    return middle


def build_reply(
    request: Request,
    state: ServerState,
    receive_ts: bytes,
    transmit_ts: bytes,
    *,
    min_poll: int = MIN_POLL,
) -> bytes:
    """The 48-byte server reply: the request's version, clamped poll and origin.

    *receive_ts* and *transmit_ts* are 8-byte NTP timestamps (``to_ntp``,
    ``ntp_from_ns``). *min_poll* is the floor for the poll field, which a rate
    limiter raises to ask a client to slow down.
    """
    return _REPLY.pack(
        state.leap << 6 | request.version << 3 | MODE_SERVER,
        state.stratum,
        _clamp_poll(request.poll, min_poll),
        _middle_of(state),
        request.transmit,
        receive_ts,
        transmit_ts,
    )


#: Kiss codes this server sends (RFC 5905 section 7.4).
KISS_RATE = b"RATE"
KISS_DENY = b"DENY"
KISS_NTSN = b"NTSN"


def build_kiss(
    request: Request,
    code: bytes,
    *,
    min_poll: int = MIN_POLL,
    receive_ts: bytes | None = None,
    transmit_ts: bytes | None = None,
) -> bytes:
    """A Kiss-o'-Death reply: LI 3, stratum 0, the kiss code as reference id.

    As ntpd does, receive and transmit default to the client's own transmit
    stamp, so the packet carries no time a client could mistake for service;
    *min_poll* raises the poll field (for ``RATE``).
    """
    if len(code) != 4 or not code.isascii():
        raise ValueError(f"kiss code must be 4 ASCII bytes, not {code!r}")
    return _KISS.pack(
        LEAP_UNSYNCHRONISED << 6 | request.version << 3 | MODE_SERVER,
        0,
        _clamp_poll(request.poll, min_poll),
        0,
        0,
        0,
        code,
        ZERO_TIMESTAMP,
        request.transmit,
        request.transmit if receive_ts is None else receive_ts,
        request.transmit if transmit_ts is None else transmit_ts,
    )


class ReplyHeads:
    """The first 24 reply bytes per (request byte 0, request poll byte), lazily.

    Filled only for requests a server answers, so at most 16 * 256 entries;
    rebuilt when the state changes.
    """

    __slots__ = ("_leap", "_middle", "_min_poll", "_stratum", "state", "table")

    def __init__(self, state: ServerState, min_poll: int) -> None:
        self.state = state
        self.table: dict[int, bytes] = {}
        self._stratum = state.stratum
        self._leap = state.leap << 6
        self._middle = state.middle()
        self._min_poll = min_poll

    def fill(self, first: int, poll_byte: int) -> bytes | None:
        if not _accepts(first):
            return None
        head = (
            bytes(
                (
                    self._leap | first & 0x38 | MODE_SERVER,
                    self._stratum,
                    _clamp_poll(_signed8(poll_byte), self._min_poll),
                )
            )
            + self._middle
        )
        self.table[first << 8 | poll_byte] = head
        return head


#: The poll a RATE kiss asks for: 64 s, well under the default 10/s limit.
RATE_KISS_MIN_POLL = 6


def kiss_reply(request: bytes, code: bytes) -> bytes | None:
    """A Kiss-o'-Death for a raw request, or ``None`` if it is not a client request.

    ``RATE`` kisses raise the poll to the minimum a rate-limited client should
    keep (2**6 s), so a well-behaved client backs off.
    """
    parsed = parse_request(request)
    if parsed is None:
        return None
    return build_kiss(
        parsed, code, min_poll=RATE_KISS_MIN_POLL if code == KISS_RATE else MIN_POLL
    )
