"""Receiving a batch: one ``recvmmsg`` into preallocated slots, read as columns.

Each column (data, sources, receive times) is one C-level ``struct`` unpack
over the slots, so what is left per datagram is the caller's own work.
"""

from __future__ import annotations

import errno
import itertools
import operator
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from udptime.mmsg.libc import (
    CONTROL_SIZE,
    DEFAULT_BATCH,
    DEFAULT_SLOT_SIZE,
    FATAL_RECEIVE,
    HEADER,
    IOVEC_SIZE,
    MMSGHDR_SIZE,
    MSG_DONTWAIT,
    MSG_ERRQUEUE,
    MSG_TRUNC,
    SO_TIMESTAMPNS,
    SOCKADDR_IN6_SIZE,
    SOCKADDR_IN_SIZE,
    TIMESTAMP_TAG,
    WOULD_BLOCK,
    control_struct,
    lengths_struct,
    libc,
    sources_struct,
)

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython without ctypes
    ctypes = None  # type: ignore[assignment]

#: recvmmsg flags: never block, and with MSG_TRUNC UDP reports each datagram's
#: real length in msg_len even when it was cut to the slot, so one unpack of
#: the lengths both sizes the data and detects truncation.
_RECV_FLAGS = MSG_DONTWAIT | MSG_TRUNC
_NS = 1_000_000_000


def socket_kind(sock: socket.socket | int) -> tuple[int, int]:
    """``(family, fd)`` of a bound UDP socket; ``ValueError`` for anything else."""
    if isinstance(sock, int):
        probe = socket.socket(fileno=sock)
        family, kind = probe.family, probe.type
        probe.detach()
        fd = sock
    else:
        family, kind, fd = sock.family, sock.type, sock.fileno()
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"need an AF_INET or AF_INET6 socket, not {family!r}")
    if kind != socket.SOCK_DGRAM:
        raise ValueError(f"need a SOCK_DGRAM socket, not {kind!r}")
    return family, fd


class Receiver:
    """Up to *batch* datagrams per ``recvmmsg`` on a bound UDP socket.

    The socket (or descriptor) stays the caller's. Each slot holds one
    datagram of up to *slot_size* bytes; a longer one is delivered as an
    empty datagram (no format may answer a part of a request) and counted.
    With *timestamps*, ``SO_TIMESTAMPNS`` is switched on and
    :meth:`received_ns` gives each datagram's kernel receive time; without,
    or for a datagram lacking one, it is *clock_ns* read once per batch.

    After ``n = receive()``, the columns describe slots ``0..n-1`` until the
    next :meth:`receive`. :attr:`names` and :attr:`name_size` locate the
    kernel-written source addresses, which the sender reuses as destinations.
    """

    def __init__(
        self,
        sock: socket.socket | int,
        batch: int = DEFAULT_BATCH,
        slot_size: int = DEFAULT_SLOT_SIZE,
        *,
        timestamps: bool = False,
        clock_ns: Callable[[], int],
    ) -> None:
        c = libc()
        if c is None or ctypes is None:
            raise OSError(errno.ENOSYS, "recvmmsg/sendmmsg are not available here")
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch must be 1..1024, not {batch}")
        if not 1 <= slot_size <= 65_536:
            raise ValueError(f"slot size must be 1..65536, not {slot_size}")
        self.family, self._fd = socket_kind(sock)
        self._recvmmsg = c.recvmmsg
        self._get_errno = c.get_errno
        self._memmove = c.memmove
        self.batch = batch
        self.slot_size = slot_size
        self.timestamps = timestamps
        self._clock_ns = clock_ns
        self._now_ns = 0
        if timestamps:
            s = socket.socket(fileno=self._fd)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            finally:
                s.detach()
        name_size = (
            SOCKADDR_IN6_SIZE if self.family == socket.AF_INET6 else SOCKADDR_IN_SIZE
        )
        self.name_size = name_size

        # Headers and control slots are adjacent so one memmove resets both:
        # the kernel consumes only msg_controllen (set to what it used).
        b = batch
        control = b * MMSGHDR_SIZE
        iov = control + b * CONTROL_SIZE
        names = iov + b * IOVEC_SIZE
        data = (names + b * name_size + 7) & ~7
        self._mem = mem = (ctypes.c_char * (data + b * slot_size))()
        base = ctypes.addressof(mem)
        self._base = base
        self._control = control
        self._names = names
        self._data = data
        #: address of name slot 0 (``name_size`` bytes each)
        self.names = base + names
        for i in range(b):
            HEADER.pack_into(
                mem,
                i * MMSGHDR_SIZE,
                base + names + i * name_size,
                name_size,
                base + iov + i * IOVEC_SIZE,
                1,
                base + control + i * CONTROL_SIZE if timestamps else 0,
                CONTROL_SIZE if timestamps else 0,
                0,
                0,
            )
            struct.pack_into(
                "=QQ", mem, iov + i * IOVEC_SIZE, base + data + i * slot_size, slot_size
            )
        self._reset = bytes(memoryview(mem).cast("B")[:iov]) if timestamps else b""
        self._lengths_structs = [lengths_struct(max(i, 1)) for i in range(b + 1)]
        self._sources_structs = [
            sources_struct(max(i, 1), self.family) for i in range(b + 1)
        ]
        self._control_structs = [control_struct(max(i, 1)) for i in range(b + 1)]
        # Data: one struct per length pattern seen twice (a flood repeats
        # its pattern; one-off patterns take the slicing path).
        self._data_structs: dict[tuple[int, ...], struct.Struct] = {}
        self._seen_once: set[tuple[int, ...]] = set()
        self._lengths: tuple[int, ...] = ()
        #: datagrams received and cut to the slot since creation; transient
        #: errors absorbed and the last errno seen
        self.received_count = 0
        self.truncated_count = 0
        self.errors = 0
        self.last_errno = 0

    def fileno(self) -> int:
        return self._fd

    def receive(self) -> int:
        """One ``recvmmsg``: datagrams now in slots ``0..n-1``, 0 for none.

        Never blocks. ``EAGAIN``, ``EINTR`` and the errors a queued ICMP
        message or a momentary shortage report are absorbed: the error queue
        is drained and the call tried once more. Only errors about the
        socket itself (``EBADF``, ``ENOTSOCK``, ...) raise.
        """
        n = self._receive_once()
        return n if n > 0 else self._receive_failed()

    def _receive_once(self) -> int:
        if self._reset:
            self._memmove(self._base, self._reset, len(self._reset))
        n: int = self._recvmmsg(self._fd, self._base, self.batch, _RECV_FLAGS, None)
        if n > 0:
            lengths = self._lengths = self._lengths_structs[n].unpack_from(self._mem)
            if max(lengths) > self.slot_size:
                self.truncated_count += sum(1 for k in lengths if k > self.slot_size)
            if not self.timestamps:
                self._now_ns = self._clock_ns()
            self.received_count += n
        return n

    def _receive_failed(self) -> int:
        err = self._get_errno()
        self._lengths = ()
        if err in WOULD_BLOCK:
            return 0
        if err != errno.EINTR:
            if err in FATAL_RECEIVE:
                raise OSError(err, f"recvmmsg: {os.strerror(err)}")
            self.errors += 1
            self.last_errno = err
            self._drain_error_queue()
        n = self._receive_once()
        if n > 0:
            return n
        err = self._get_errno()
        if err not in WOULD_BLOCK:
            self.errors += 1
            self.last_errno = err
        return 0

    def _drain_error_queue(self) -> None:
        """Read away queued ICMP reports, which crowd out requests otherwise."""
        for _ in range(4):
            got = self._recvmmsg(
                self._fd, self._base, self.batch, MSG_ERRQUEUE | MSG_DONTWAIT, None
            )
            if got < self.batch:
                break

    def lengths(self, n: int) -> tuple[int, ...]:
        """Real lengths of the datagrams in slots ``0..n-1`` (may exceed the slot)."""
        return self._lengths[:n]

    def data(self, n: int) -> tuple[bytes, ...]:
        """The datagrams in slots ``0..n-1``; one longer than a slot is ``b""``."""
        lengths = self._lengths
        if n != len(lengths):
            lengths = lengths[:n]
        st = self._data_structs.get(lengths)
        if st is not None:
            return st.unpack_from(self._mem, self._data)
        if not lengths:
            return ()
        size = self.slot_size
        if max(lengths) > size:
            lengths = tuple([0 if k > size else k for k in lengths])
        elif lengths in self._seen_once:
            if len(self._data_structs) >= 1024:
                self._data_structs.clear()
            st = struct.Struct("".join([f"{k}s{size - k}x" for k in lengths]))
            self._data_structs[lengths] = st
            return st.unpack_from(self._mem, self._data)
        else:
            if len(self._seen_once) >= 4096:
                self._seen_once.clear()
            self._seen_once.add(lengths)
        mem: Any = self._mem  # c_char array: slices are bytes
        start = self._data
        return tuple(
            [
                mem[o : o + k]
                for o, k in zip(range(start, start + n * size, size), lengths)
            ]
        )

    def sources(self, n: int) -> tuple[tuple[bytes, ...], tuple[int, ...]]:
        """Packed source addresses (4 or 16 bytes) and ports of slots ``0..n-1``.

        On an ``AF_INET6`` socket IPv4 peers are IPv4-mapped 16-byte addresses.
        """
        if not n:
            return (), ()
        flat: tuple[Any, ...] = self._sources_structs[n].unpack_from(
            self._mem, self._names
        )
        return flat[1::2], flat[0::2]

    def received_ns(self, n: int) -> list[int]:
        """Receive times of slots ``0..n-1`` as integer POSIX nanoseconds."""
        if not self.timestamps:
            return [self._now_ns] * n
        if not n:
            return []
        flat: tuple[int, ...] = self._control_structs[n].unpack_from(
            self._mem, self._control
        )
        if flat[0::3].count(TIMESTAMP_TAG) == n:
            # sec * 10**9 + nsec for the whole batch, in C.
            scaled = map(operator.mul, flat[1::3], itertools.repeat(_NS, n))
            return list(map(operator.add, scaled, flat[2::3]))
        fallback = self._clock_ns()
        return [
            s * _NS + ns if tag == TIMESTAMP_TAG else fallback
            for tag, s, ns in zip(flat[0::3], flat[1::3], flat[2::3])
        ]
