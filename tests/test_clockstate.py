"""The kernel clock reader (live, on this machine) and the state derived from it."""

from __future__ import annotations

import ctypes
import sys
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime import clockstate
from udptime.clockstate import (
    STA_DEL,
    STA_INS,
    STA_UNSYNC,
    TIME_DEL,
    TIME_ERROR,
    TIME_INS,
    TIME_OK,
    TIME_OOP,
    TIME_WAIT,
    ClockStateCache,
    KernelClock,
    measure_precision,
    read_kernel_clock,
    server_state,
)
from udptime.ntp import ServerState, to_ntp

NOW = 1_700_000_000.5
SYNCED = KernelClock(state=TIME_OK, status=0x2001, maxerror=25_000, esterror=1_000)
LP64 = ctypes.sizeof(ctypes.c_long) == 8 == ctypes.sizeof(ctypes.c_void_p)


class TimexLayoutTests(unittest.TestCase):
    def test_lp64_layout(self) -> None:
        """Offsets of glibc's x86_64/aarch64 ``struct timex`` (bits/timex.h)."""
        if not LP64:
            raise unittest.SkipTest("not an LP64 platform")
        timex = clockstate._Timex
        self.assertEqual(ctypes.sizeof(timex), 208)
        offsets = {
            "modes": 0,
            "offset": 8,
            "maxerror": 24,
            "esterror": 32,
            "status": 40,
            "constant": 48,
            "time": 72,
            "tick": 88,
            "shift": 112,
            "stabil": 120,
            "stbcnt": 152,
            "tai": 160,
        }
        for name, offset in offsets.items():
            self.assertEqual(getattr(timex, name).offset, offset, name)


class LiveKernelTests(unittest.TestCase):
    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            raise unittest.SkipTest("adjtimex is Linux only")

    def test_reads_sane_fields(self) -> None:
        kernel = read_kernel_clock()
        assert kernel is not None
        self.assertIn(kernel.state, range(6))
        self.assertEqual(kernel.status & ~0xFFFF, 0)
        self.assertTrue(0 <= kernel.maxerror <= 16_000_000)
        self.assertTrue(0 <= kernel.esterror <= 16_000_000)
        if kernel.status & STA_UNSYNC:
            # The kernel reports an unsynchronised clock as TIME_ERROR.
            self.assertEqual(kernel.state, TIME_ERROR)
            self.assertFalse(kernel.synchronised)

    def test_kernel_time_matches(self) -> None:
        """The ``time`` field lands where the kernel writes it: the layout is right."""
        read = clockstate._read_timex()
        assert read is not None
        self.assertLess(abs(read[1].time.tv_sec - time.time()), 5)

    def test_read_changes_nothing(self) -> None:
        before = read_kernel_clock()
        after = read_kernel_clock()
        assert before is not None and after is not None
        self.assertEqual(before.status, after.status)


class UnreadableTests(unittest.TestCase):
    def test_no_adjtimex(self) -> None:
        self.patch(clockstate, "_load_adjtimex", lambda: None)
        self.assertIsNone(read_kernel_clock())

    def test_adjtimex_fails(self) -> None:
        self.patch(clockstate, "_load_adjtimex", lambda: lambda pointer: -1)
        self.assertIsNone(read_kernel_clock())


class ServerStateTests(unittest.TestCase):
    def state(
        self, kernel: KernelClock | None, local_stratum: int | None = None
    ) -> ServerState:
        return server_state(kernel, 2, local_stratum, -20, NOW)

    def test_synchronised(self) -> None:
        self.assertEqual(
            self.state(SYNCED),
            ServerState(0, 2, -20, 0.0, 0.025, b"KERN", NOW),
        )

    def test_refid_and_stratum(self) -> None:
        state = server_state(SYNCED, 4, None, -20, NOW, refid=b"\xc0\x00\x02\x01")
        self.assertEqual((state.stratum, state.refid), (4, b"\xc0\x00\x02\x01"))

    def test_pending_leap(self) -> None:
        cases = [
            (TIME_INS, STA_INS, 1),
            (TIME_OOP, STA_INS, 1),
            (TIME_DEL, STA_DEL, 2),
            (TIME_OK, 0, 0),
            # After the leap: STA_INS/STA_DEL stay set until the daemon
            # clears them, but the adjtimex state says it is over.
            (TIME_WAIT, STA_INS, 0),
            (TIME_WAIT, STA_DEL, 0),
        ]
        for kernel_state, status, leap in cases:
            kernel = KernelClock(kernel_state, status, 1000, 10)
            self.assertEqual(self.state(kernel).leap, leap)

    def test_unsynchronised(self) -> None:
        unsynced = ServerState(3, 16, -20, 0.0, 16.0, b"INIT", None)
        for kernel in (
            KernelClock(TIME_ERROR, STA_UNSYNC, 16_000_000, 16_000_000),
            KernelClock(TIME_OK, STA_UNSYNC | STA_INS, 1000, 10),
            KernelClock(TIME_ERROR, 0, 1000, 10),
            None,
        ):
            self.assertEqual(self.state(kernel), unsynced, kernel)

    def test_local_stratum(self) -> None:
        local = ServerState(0, 9, -20, 0.0, 0.01, b"LOCL", NOW)
        unsynced = KernelClock(TIME_ERROR, STA_UNSYNC, 16_000_000, 16_000_000)
        self.assertEqual(self.state(unsynced, local_stratum=9), local)
        self.assertEqual(self.state(None, local_stratum=9), local)
        # A synchronised kernel wins over the local fallback.
        self.assertEqual(self.state(SYNCED, local_stratum=9).stratum, 2)

    @given(
        st.integers(0, 5),
        st.integers(0, 0xFFFF),
        st.integers(-(2**63), 2**63 - 1),
        st.one_of(st.none(), st.integers(1, 15)),
    )
    def test_any_kernel_gives_a_packable_state(
        self, kernel_state: int, status: int, maxerror: int, local: int | None
    ) -> None:
        kernel = KernelClock(kernel_state, status, maxerror, 0)
        state = server_state(kernel, 2, local, -20, NOW)
        self.assertEqual(len(state.middle()), 21)
        self.assertEqual(state.leap == 3, not kernel.synchronised and local is None)


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ClockStateCacheTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = FakeClock()
        self.reads = 0
        self.kernel: KernelClock | None = None
        self.cache = ClockStateCache(self.clock, self.read, precision=-20)

    def read(self) -> KernelClock | None:
        self.reads += 1
        return self.kernel

    def test_read_once_a_second(self) -> None:
        self.assertEqual(self.reads, 1)
        first = self.cache()
        self.clock.now += 0.999
        self.assertIs(self.cache(), first)
        self.assertEqual(self.reads, 1)
        self.clock.now += 0.001
        self.assertIs(self.cache(), first)  # re-read, unchanged: same object
        self.assertEqual(self.reads, 2)

    def test_follows_the_kernel(self) -> None:
        self.assertEqual(self.cache().leap, 3)
        self.kernel = SYNCED
        self.assertEqual(self.cache().leap, 3)
        self.clock.now += 1
        state = self.cache()
        self.assertEqual((state.leap, state.stratum), (0, 2))
        self.assertEqual(to_ntp(state.reference_time or 0), to_ntp(self.clock.now))

    def test_clock_stepped_back(self) -> None:
        self.cache()
        self.clock.now -= 3600
        self.cache()
        self.assertEqual(self.reads, 2)
        self.clock.now += 0.5
        self.cache()
        self.assertEqual(self.reads, 2)

    def test_bad_refid_fails_at_construction(self) -> None:
        # Strata are checked once, by the configuration (--stratum).
        self.assertRaises(
            ValueError, ClockStateCache, self.clock, self.read, refid=b"TOOLONG"
        )

    def test_measured_precision_by_default(self) -> None:
        cache = ClockStateCache(self.clock, self.read)
        self.assertTrue(-32 <= cache().precision <= 0)


class PrecisionTests(unittest.TestCase):
    def test_measure_precision(self) -> None:
        precision = measure_precision()
        self.assertTrue(-32 <= precision <= 0, precision)
        # Never finer than the clock's advertised resolution.
        self.assertGreaterEqual(2.0**precision, time.clock_getres(time.CLOCK_REALTIME))
