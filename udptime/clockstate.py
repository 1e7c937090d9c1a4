"""What the kernel says about its clock, turned into what NTP replies advertise.

The server does not discipline the clock itself: chrony, ntpd or
systemd-timesyncd does, and tells the kernel. ``adjtimex`` with ``modes = 0``
reads that back (synchronised or not, leap second pending, maximum error)
without changing anything and without privileges.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from udptime.ntp import (
    LEAP_DELETE,
    LEAP_INSERT,
    LEAP_NONE,
    LEAP_UNSYNCHRONISED,
    ServerState,
    precision_exponent,
)

# Kernel status bits (struct timex .status) this module reads.
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040

# adjtimex return values: the clock state.
TIME_OK = 0
TIME_INS = 1
TIME_DEL = 2
TIME_OOP = 3
TIME_WAIT = 4
TIME_ERROR = 5

DEFAULT_STRATUM = 2
#: Reference id while synchronised. The upstream a stratum 2+ server names
#: here (as an IPv4 address) is known only to the daemon disciplining the
#: clock, so the default says where this server takes its time from instead;
#: operators can name the upstream through the ``refid`` option.
DEFAULT_REFID = b"KERN"
#: Reference id while unsynchronised (RFC 5905 "INIT": not yet synchronised).
UNSYNCHRONISED_REFID = b"INIT"
#: Reference id when serving the undisciplined local clock.
LOCAL_REFID = b"LOCL"
UNSYNCHRONISED_STRATUM = 16
#: Root dispersion (s) advertised when unsynchronised: RFC 5905 MAXDISP.
MAX_DISPERSION = 16.0
#: Root dispersion (s) advertised for the local clock, as ntpd's local driver.
LOCAL_DISPERSION = 0.01


@dataclass(frozen=True)
class KernelClock:
    """The fields of the kernel's ``struct timex`` and ``adjtimex`` result used here.

    ``maxerror`` and ``esterror`` are microseconds.
    """

    state: int
    status: int
    maxerror: int
    esterror: int

    @property
    def synchronised(self) -> bool:
        return not self.status & STA_UNSYNC and self.state != TIME_ERROR


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _Timex(ctypes.Structure):
    """glibc ``struct timex`` for LP64 (x86_64, aarch64) and the 32-bit ``adjtimex``.

    Every ``__syscall_slong_t`` is a C ``long`` there; natural alignment adds
    the same padding the header spells out after ``modes``, ``status`` and
    ``shift`` (208 bytes on LP64). Not right for x32.
    """

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


_adjtimex: Callable[..., int] | None = None


def _load_adjtimex() -> Callable[..., int] | None:
    global _adjtimex
    if _adjtimex is None and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            function = libc.adjtimex
        except (OSError, AttributeError):
            return None
        function.argtypes = [ctypes.POINTER(_Timex)]
        function.restype = ctypes.c_int
        _adjtimex = function
    return _adjtimex


def _read_timex() -> tuple[int, _Timex] | None:
    """``adjtimex`` with ``modes = 0`` (read only): its result and the struct."""
    adjtimex = _load_adjtimex()
    if adjtimex is None:
        return None
    timex = _Timex()
    timex.modes = 0
    result = adjtimex(ctypes.pointer(timex))
    if result < 0:
        return None
    return result, timex


def read_kernel_clock() -> KernelClock | None:
    """The kernel clock discipline, or ``None`` off Linux or when unreadable."""
    read = _read_timex()
    if read is None:
        return None
    result, timex = read
    return KernelClock(result, timex.status, timex.maxerror, timex.esterror)


def measure_precision(samples: int = 64) -> int:
    """The NTP precision of ``time.time``: its resolution or step, whichever is larger.

    RFC 5905 suggests the minimum time to read the clock; the smallest
    nonzero step between successive reads measures that and a coarse tick.
    """
    try:
        resolution = time.clock_getres(time.CLOCK_REALTIME)
    except (AttributeError, OSError):
        resolution = time.get_clock_info("time").resolution
    step = None
    previous = time.time_ns()
    for _ in range(samples * 16):
        now = time.time_ns()
        if now > previous:
            delta = now - previous
            step = delta if step is None else min(step, delta)
            samples -= 1
            if samples <= 0:
                break
        previous = now
    seconds = max(resolution, step / 1e9 if step is not None else 0.0)
    return precision_exponent(seconds if seconds > 0 else 1e-9)


def server_state(
    kernel: KernelClock | None,
    stratum: int,
    local_stratum: int | None,
    precision: int,
    now: float,
    *,
    refid: bytes = DEFAULT_REFID,
) -> ServerState:
    """What to advertise, from the kernel clock read at *now* (POSIX seconds).

    Synchronised (no ``STA_UNSYNC``, not ``TIME_ERROR``): LI from the pending
    leap second, *stratum*, *refid*, root dispersion = kernel maxerror (which
    the disciplining daemon sets to its root distance and the kernel grows
    by 500 ppm), root delay 0 as it is inside that bound already, and
    reference time *now*: a disciplined kernel clock is corrected all the time.

    Unsynchronised or unreadable: LI 3, stratum 16, ``INIT``, so that clients
    ignore this server; unless *local_stratum* asks to serve the local clock
    anyway (LI 0, that stratum, ``LOCL``, 10 ms dispersion).
    """
    if kernel is not None and kernel.synchronised:
        if kernel.state == TIME_WAIT:
            # The leap second is over; the kernel keeps STA_INS/STA_DEL set
            # until the daemon clears them, but nothing is pending any more.
            leap = LEAP_NONE
        elif kernel.status & STA_INS:
            leap = LEAP_INSERT
        elif kernel.status & STA_DEL:
            leap = LEAP_DELETE
        else:
            leap = LEAP_NONE
        return ServerState(
            leap=leap,
            stratum=stratum,
            precision=precision,
            root_delay=0.0,
            root_dispersion=max(kernel.maxerror, 0) / 1e6,
            refid=refid,
            reference_time=now,
        )
    if local_stratum is not None:
        return ServerState(
            leap=LEAP_NONE,
            stratum=local_stratum,
            precision=precision,
            root_delay=0.0,
            root_dispersion=LOCAL_DISPERSION,
            refid=LOCAL_REFID,
            reference_time=now,
        )
    return ServerState(
        leap=LEAP_UNSYNCHRONISED,
        stratum=UNSYNCHRONISED_STRATUM,
        precision=precision,
        root_delay=0.0,
        root_dispersion=MAX_DISPERSION,
        refid=UNSYNCHRONISED_REFID,
        reference_time=None,
    )


class ClockStateCache:
    """The current ``ServerState``, re-read from the kernel at most every *interval*.

    Called per datagram, so it costs one *clock* read between refreshes and
    returns the same object while nothing changed (responders compare by
    identity). A clock stepped backwards forces a refresh.
    """

    __slots__ = (
        "_clock",
        "_interval",
        "_local_stratum",
        "_precision",
        "_read_at",
        "_reader",
        "_refid",
        "_state",
        "_stratum",
    )

    def __init__(
        self,
        clock: Callable[[], float],
        reader: Callable[[], KernelClock | None] = read_kernel_clock,
        *,
        stratum: int = DEFAULT_STRATUM,
        local_stratum: int | None = None,
        precision: int | None = None,
        refid: bytes = DEFAULT_REFID,
        interval: float = 1.0,
    ) -> None:
        if len(refid) != 4:
            raise ValueError(f"reference id must be 4 bytes, not {refid!r}")
        self._clock = clock
        self._reader = reader
        self._stratum = stratum
        self._local_stratum = local_stratum
        self._precision = measure_precision() if precision is None else precision
        self._refid = refid
        self._interval = interval
        self._read_at = clock()
        # Built now so that bad options fail at startup, not per datagram.
        self._state = self._read(self._read_at)

    def _read(self, now: float) -> ServerState:
        return server_state(
            self._reader(),
            self._stratum,
            self._local_stratum,
            self._precision,
            now,
            refid=self._refid,
        )

    def __call__(self) -> ServerState:
        now = self._clock()
        read_at = self._read_at
        if now - read_at >= self._interval or now < read_at:
            self._read_at = now
            state = self._read(now)
            if state != self._state:
                self._state = state
        return self._state
