"""The text formats on the wire: the recipe's ctime, RFC 867 daytime, RFC 868 time.

Pure encoders from an instant to reply bytes, and the test that tells a
request apart from another server's reply (the loop guard). Their responder
is ``udptime.responders.text``.
"""

from __future__ import annotations

import math
import re
import time

#: Seconds from 1900-01-01T00:00:00Z (the RFC 868 and NTP epoch) to 1970.
EPOCH_1900_TO_1970 = 2_208_988_800


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
REPLY_LENGTHS = frozenset({4, 22, 24})
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
