"""Reply formats: pure encoders from an instant to reply bytes, and their registry.

A responder turns one request datagram and its receive time into the reply
bytes, or ``None`` for "no reply". Responders do no I/O and never read a clock
of their own unless their protocol needs a transmit stamp (NTP), which their
factory then receives.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

#: Seconds from 1900-01-01T00:00:00Z (the RFC 868 and NTP epoch) to 1970.
EPOCH_1900_TO_1970 = 2_208_988_800

Responder = Callable[[bytes, float], "bytes | None"]
"""``(request, receive time as POSIX seconds) -> reply bytes or None``."""


def encode_ctime(moment: float) -> bytes:
    """The recipe's reply: ``time.ctime()`` in local time, ASCII, no newline."""
    return time.ctime(moment).encode("ascii")


def encode_daytime(moment: float) -> bytes:
    """RFC 867 daytime as an RFC 3339 UTC timestamp, whole seconds, CRLF."""
    whole = math.floor(moment)
    days, rem = divmod(whole, 86_400)
    year, month, day = _civil_from_days(days)
    hour, rem = divmod(rem, 3600)
    minute, second = divmod(rem, 60)
    text = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z\r\n"
    return text.encode("ascii")


def encode_time(moment: float) -> bytes:
    """RFC 868: seconds since 1900 as 32 unsigned big-endian bits, mod 2**32."""
    return ((math.floor(moment) + EPOCH_1900_TO_1970) % 2**32).to_bytes(4, "big")


def _civil_from_days(days: int) -> tuple[int, int, int]:
    """Proleptic Gregorian date of a day count from 1970-01-01.

    Howard Hinnant's algorithm: exact for any year, unlike ``time.gmtime`` and
    ``datetime`` which refuse years outside 1..9999 or before the C library's
    range.
    """
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    year = yoe + era * 400 + (1 if month <= 2 else 0)
    return year, month, day


_CTIME_REPLY = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")
_DAYTIME_REPLY = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\r\n")
#: Lengths of the replies above (RFC 868's is 4 bytes), for a cheap first test.
_REPLY_LENGTHS = frozenset({4, 22, 24})
_RFC868_WINDOW = 86_400


def looks_like_time_reply(datagram: bytes, moment: float) -> bool:
    """Whether *datagram* is what a ctime, daytime or time server sends.

    Clients send empty or arbitrary datagrams; a time server's reply arriving
    as a request means another server (or this one, spoofed) is talking to us.
    Answering it is how two servers ping-pong forever, on any port pair, so
    the text formats stay silent. A 4-byte datagram counts as an RFC 868
    reply only when it reads as within a day of *moment*.
    """
    size = len(datagram)
    if size == 4:
        ours = (math.floor(moment) + EPOCH_1900_TO_1970) % 2**32
        skew = (int.from_bytes(datagram, "big") - ours) % 2**32
        return skew <= _RFC868_WINDOW or skew >= 2**32 - _RFC868_WINDOW
    if size == 24:
        return _CTIME_REPLY.fullmatch(datagram) is not None
    if size == 22:
        return _DAYTIME_REPLY.fullmatch(datagram) is not None
    return False


class SecondCache:
    """A text format's responder: the reply changes once a second, not per datagram.

    Stays silent for requests that are themselves time-server replies (see
    :func:`looks_like_time_reply`).
    """

    __slots__ = ("_encode", "_reply", "_second")

    def __init__(self, encode: Callable[[float], bytes]) -> None:
        self._encode = encode
        self._second: int | None = None
        self._reply = b""

    def __call__(self, request: bytes, moment: float) -> bytes | None:
        if len(request) in _REPLY_LENGTHS and looks_like_time_reply(request, moment):
            return None
        second = math.floor(moment)
        if second != self._second:
            self._reply = self._encode(second)
            self._second = second
        return self._reply


@dataclass(frozen=True)
class Settings:
    """What a responder factory may need beyond the request; grows with formats."""

    wall_clock: Callable[[], float] = time.time
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Format:
    """A named reply format.

    ``echoes_anything`` marks formats that reply to any datagram (the text
    formats); the loop guard refuses to answer the well-known ports of other
    such services for them. ``kiss`` builds a protocol-level refusal (NTP's
    Kiss-o'-Death) from a request and a 4-byte code, or ``None`` when the
    request does not deserve one; formats without it are refused silently.
    """

    name: str
    make_responder: Callable[[Settings], Responder]
    echoes_anything: bool
    summary: str
    kiss: Callable[[bytes, bytes], bytes | None] | None = None
    #: replies end in a transmit timestamp to rewrite right before the send,
    #: and the receive time should be the kernel's (NTP)
    stamps_time: bool = False


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    _REGISTRY[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The format called *name*; ``KeyError`` names the known ones."""
    _load_optional_formats()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown format {name!r} (known: {', '.join(format_names())})"
        ) from None


def format_names() -> list[str]:
    _load_optional_formats()
    return sorted(_REGISTRY)


#: Modules holding further formats; each registers itself when imported.
FORMAT_MODULES: tuple[str, ...] = ("udptime.ntp",)


def _load_optional_formats() -> None:
    for module in FORMAT_MODULES:
        importlib.import_module(module)


register(
    Format(
        "ctime",
        lambda settings: SecondCache(encode_ctime),
        echoes_anything=True,
        summary="time.ctime() text in local time, as the recipe's server",
    )
)
register(
    Format(
        "daytime",
        lambda settings: SecondCache(encode_daytime),
        echoes_anything=True,
        summary="RFC 867 daytime: RFC 3339 UTC line ending in CRLF",
    )
)
register(
    Format(
        "time",
        lambda settings: SecondCache(encode_time),
        echoes_anything=True,
        summary="RFC 868 time: 32-bit big-endian seconds since 1900, mod 2**32",
    )
)
