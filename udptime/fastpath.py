"""Batched UDP I/O for Linux: ``recvmmsg``/``sendmmsg`` through ctypes.

Twisted's ``DatagramProtocol`` makes two system calls, a ``(host, port)``
tuple and a handful of Python frames per datagram. This module moves up to
*batch* datagrams per system call each way and hands them to the caller as
columns built by single C calls (``struct`` unpacks over preallocated
buffers), so what is left per datagram is the caller's own work.

How a caller answers a batch::

    bs = BatchSocket(sock, timestamps=True)     # sock: bound, non-blocking UDP
    n = bs.receive()                            # 0: nothing (or a transient error)
    if n:
        addrs, ports = bs.sources(n)            # packed 4/16-byte addresses, ports
        replies = [
            respond(data, rx) if admit(packed, port, rx) else None
            for data, packed, port, rx in zip(bs.data(n), addrs, ports, bs.received(n))
        ]
        dropped = bs.send(replies)              # slot-aligned: replies[i] goes to
                                                # the source of datagram i; None skips

``send`` reuses the kernel-written source ``sockaddr`` of each slot as the
destination, so no address is converted either way. With ``stamp=`` the
last 8 bytes of every reply are taken from one ``stamp()`` call made right
before ``sendmmsg`` (scatter-gather: one shared 8-byte buffer, nothing
written per reply), which is how an NTP server stamps its transmit time as
late as possible.

:class:`FastReader` is the Twisted side: an ``IReadDescriptor`` for
``reactor.addReader`` that drains the socket in batches and calls a handler
``(BatchSocket, n) -> replies | None`` per batch (see :data:`BatchHandler`).

Everything imports on any platform; :func:`available` says whether the batch
path works here (Linux, 64-bit, libc with both calls). Callers fall back to
the portable Twisted path otherwise.

Struct layouts (LP64 Linux: x86_64, aarch64; checked against ctypes at
import)::

    struct iovec   { void *base; size_t len; }                        16 bytes
    struct msghdr  { void *name; socklen_t namelen; /*pad 4*/
                     struct iovec *iov; size_t iovlen;
                     void *control; size_t controllen;
                     int flags; /*pad 4*/ }                           56 bytes
    struct mmsghdr { struct msghdr hdr; unsigned len; /*pad 4*/ }     64 bytes
    struct cmsghdr { size_t len; int level; int type; /* data */ }    16 bytes
    struct timespec { time_t sec; long nsec; }                        16 bytes
    sockaddr_in  16 bytes: family, port (big-endian) @2, address @4
    sockaddr_in6 28 bytes: family, port @2, flowinfo @4, address @8, scope @24
"""

from __future__ import annotations

import errno
import functools
import itertools
import operator
import os
import socket
import struct
import sys
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython without ctypes
    ctypes = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SLOT_SIZE",
    "BatchHandler",
    "BatchSocket",
    "FastReader",
    "available",
]

DEFAULT_BATCH = 64
DEFAULT_SLOT_SIZE = 2048
#: Batches one ``doRead`` handles at most before yielding to the reactor.
DEFAULT_MAX_BATCHES = 16

# <sys/socket.h>, Linux values (identical on x86_64 and aarch64).
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_ERRQUEUE = 0x2000
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS

#: recvmmsg flags: never block, and with MSG_TRUNC UDP reports each datagram's
#: real length in msg_len even when it was cut to the slot, so one unpack of
#: the lengths both sizes the data and detects truncation.
_RECV_FLAGS = MSG_DONTWAIT | MSG_TRUNC

_MMSGHDR_SIZE = 64
_IOVEC_SIZE = 16
_MSG_LEN_OFFSET = 56
_IOVLEN_OFFSET = 24
#: CMSG_SPACE(sizeof(struct timespec)): header 16 + data 16.
_CONTROL_SIZE = 32
_SOCKADDR_IN_SIZE = 16
_SOCKADDR_IN6_SIZE = 28
_STAMP_SIZE = 8

#: Failures about the socket or the call itself, not about one datagram or
#: one queued ICMP report: these raise. Every other error is absorbed.
_FATAL_RECEIVE = frozenset(
    {errno.EBADF, errno.ENOTSOCK, errno.EFAULT, errno.EINVAL, errno.ENOTCONN}
)
_FATAL_SEND = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EFAULT})
_WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
_SEND_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})

_HEADER = struct.Struct("=QI4xQQQQi4xI4x")
_U64 = struct.Struct("=Q")
#: The two halves of a send mmsghdr: name pointer and length, then iovec
#: pointer and count with the zero control, flags and msg_len fields.
_NAME_PART = struct.Struct("=QI4x")
_IOV_PART = struct.Struct("=QQ32x")
_NONES = itertools.repeat(None)


# ---------------------------------------------------------------------------
# libc binding and layout checks


def _layout_ok() -> bool:
    """Whether this platform's C structs are the LP64 layout hard-coded here."""
    if ctypes is None or struct.calcsize("P") != 8:
        return False

    class IoVec(ctypes.Structure):
        _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))

    class MsgHdr(ctypes.Structure):
        _fields_ = (
            ("name", ctypes.c_void_p),
            ("namelen", ctypes.c_uint32),
            ("iov", ctypes.c_void_p),
            ("iovlen", ctypes.c_size_t),
            ("control", ctypes.c_void_p),
            ("controllen", ctypes.c_size_t),
            ("flags", ctypes.c_int),
        )

    class MMsgHdr(ctypes.Structure):
        _fields_ = (("hdr", MsgHdr), ("len", ctypes.c_uint))

    class CMsgHdr(ctypes.Structure):
        _fields_ = (
            ("len", ctypes.c_size_t),
            ("level", ctypes.c_int),
            ("type", ctypes.c_int),
        )

    class TimeSpec(ctypes.Structure):
        _fields_ = (("sec", ctypes.c_long), ("nsec", ctypes.c_long))

    expected = {
        (IoVec, "len"): 8,
        (MsgHdr, "namelen"): 8,
        (MsgHdr, "iov"): 16,
        (MsgHdr, "iovlen"): _IOVLEN_OFFSET,
        (MsgHdr, "control"): 32,
        (MsgHdr, "controllen"): 40,
        (MsgHdr, "flags"): 48,
        (MMsgHdr, "len"): _MSG_LEN_OFFSET,
        (CMsgHdr, "type"): 12,
        (TimeSpec, "nsec"): 8,
    }
    for (cls, name), offset in expected.items():
        if getattr(cls, name).offset != offset:
            return False
    sizes = (
        ctypes.sizeof(IoVec) == _IOVEC_SIZE
        and ctypes.sizeof(MsgHdr) == 56
        and ctypes.sizeof(MMsgHdr) == _MMSGHDR_SIZE
        and ctypes.sizeof(CMsgHdr) == 16
        and ctypes.sizeof(TimeSpec) == 16
        and _HEADER.size == _MMSGHDR_SIZE
    )
    return sizes


class _Libc:
    """``recvmmsg``/``sendmmsg`` with integer arguments, errno kept by ctypes.

    ``PyDLL``: the calls never block (``MSG_DONTWAIT``), so keeping the GIL
    saves its release and re-acquisition on every call.
    """

    def __init__(self) -> None:
        assert ctypes is not None
        lib = ctypes.PyDLL(None, use_errno=True)
        recv = lib.recvmmsg
        recv.argtypes = (
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_void_p,
        )
        recv.restype = ctypes.c_int
        send = lib.sendmmsg
        send.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int)
        send.restype = ctypes.c_int
        self.recvmmsg: Callable[[int, int, int, int, None], int] = recv
        self.sendmmsg: Callable[[int, int, int, int], int] = send
        self.get_errno: Callable[[], int] = ctypes.get_errno
        self.memmove: Callable[[int, bytes, int], int] = ctypes.memmove


@functools.cache
def _libc() -> _Libc | None:
    if not sys.platform.startswith("linux") or not _layout_ok():
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """True when :class:`BatchSocket` works here: Linux, LP64, libc mmsg calls."""
    return _libc() is not None


# ---------------------------------------------------------------------------
# Struct formats, one per batch size, shared by all sockets


@functools.cache
def _lengths_struct(n: int) -> struct.Struct:
    """msg_len of n consecutive mmsghdrs."""
    return struct.Struct("=" + "56xI4x" * n)


@functools.cache
def _sources_struct(n: int, family: int) -> struct.Struct:
    """(port, address bytes) pairs from n consecutive name slots."""
    if family == socket.AF_INET6:
        return struct.Struct("!" + "2xH4x16s4x" * n)
    return struct.Struct("!" + "2xH4s8x" * n)


@functools.cache
def _control_struct(n: int) -> struct.Struct:
    """(level and type as one int, tv_sec, tv_nsec) of n control slots' first cmsg."""
    return struct.Struct("=" + "8xqqq" * n)


#: cmsg_level SOL_SOCKET and cmsg_type SCM_TIMESTAMPNS read as one native
#: 64-bit integer: one comparison per datagram checks both.
_TIMESTAMP_TAG: int = struct.unpack(
    "=q", struct.pack("=ii", socket.SOL_SOCKET, SCM_TIMESTAMPNS)
)[0]


@functools.cache
def _iovec_struct(n: int) -> struct.Struct:
    """n consecutive iovecs (base, len)."""
    return struct.Struct("=" + "QQ" * n)


# ---------------------------------------------------------------------------


class BatchSocket:
    """Up to *batch* datagrams per system call on an existing UDP socket.

    *sock* is a bound, non-blocking ``SOCK_DGRAM`` socket of family
    ``AF_INET`` or ``AF_INET6`` (dual-stack sockets report IPv4 peers as
    IPv4-mapped 16-byte addresses), or its file descriptor. It stays the
    caller's: this class never closes it.

    Each of the *batch* slots holds one datagram of up to *slot_size* bytes;
    longer ones are cut to the slot and listed by :meth:`truncated`.

    With *timestamps*, ``SO_TIMESTAMPNS`` is switched on and
    :meth:`received` gives each datagram's kernel receive time; without, or
    for a datagram that lacks one, it is *clock* read once per batch.

    After ``n = receive()``, the column methods (:meth:`data`,
    :meth:`sources`, :meth:`received`, ...) describe slots ``0..n-1``; each
    costs one C-level unpack, so ask only for what the batch needs. They are
    valid until the next :meth:`receive`.
    """

    def __init__(
        self,
        sock: socket.socket | int,
        batch: int = DEFAULT_BATCH,
        slot_size: int = DEFAULT_SLOT_SIZE,
        *,
        timestamps: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        libc = _libc()
        if libc is None:
            raise OSError(
                errno.ENOSYS, "recvmmsg/sendmmsg batch I/O is not available here"
            )
        assert ctypes is not None
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch must be 1..1024, not {batch}")
        if not 1 <= slot_size <= 65_536:
            raise ValueError(f"slot size must be 1..65536, not {slot_size}")
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
        self._libc = libc
        self._recvmmsg = libc.recvmmsg
        self._sendmmsg = libc.sendmmsg
        self._get_errno = libc.get_errno
        self._memmove = libc.memmove
        self._fd = fd
        self.family = family
        self.batch = batch
        self.slot_size = slot_size
        self.timestamps = timestamps
        self._clock = clock
        self._now = 0.0

        if timestamps:
            s = socket.socket(fileno=fd)
            try:
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            finally:
                s.detach()

        name_size = (
            _SOCKADDR_IN6_SIZE if family == socket.AF_INET6 else _SOCKADDR_IN_SIZE
        )
        self._name_size = name_size

        # One ctypes buffer, regions in this order. The receive headers and
        # their control slots are adjacent so one memmove resets both.
        b = batch
        off = 0
        self._rx_hdr = off
        off += b * _MMSGHDR_SIZE
        self._control = off
        off += b * _CONTROL_SIZE
        rx_reset_end = off
        # Four arrays of send headers, [stamped][gaps]. Without gaps reply j
        # goes to the source of slot j, whose name the kernel wrote into
        # name slot j: those arrays are constant (but for the patches of
        # unstamped replies, undone at the next send). With gaps, header j
        # names slot slots[j]: those arrays are assembled per send from
        # prebuilt halves (name part per slot, iovec part per position).
        tx_start = off
        off += 4 * b * _MMSGHDR_SIZE
        self._rx_iov = off
        off += b * _IOVEC_SIZE
        self._tx_iov = off
        off += b * _IOVEC_SIZE
        self._tx2_iov = off
        off += b * 2 * _IOVEC_SIZE
        self._names = off
        off += b * name_size
        off = (off + 7) & ~7
        self._stamp = off
        off += _STAMP_SIZE
        self._data = off
        off += b * slot_size
        self._mem = mem = (ctypes.c_char * off)()
        self._view = memoryview(mem).cast("B")
        base = ctypes.addressof(mem)
        self._base = base

        control_len = _CONTROL_SIZE if timestamps else 0
        for i in range(b):
            _HEADER.pack_into(
                mem,
                self._rx_hdr + i * _MMSGHDR_SIZE,
                base + self._names + i * name_size,
                name_size,
                base + self._rx_iov + i * _IOVEC_SIZE,
                1,
                base + self._control + i * _CONTROL_SIZE if timestamps else 0,
                control_len,
                0,
                0,
            )
            struct.pack_into(
                "=QQ",
                mem,
                self._rx_iov + i * _IOVEC_SIZE,
                base + self._data + i * slot_size,
                slot_size,
            )
        self._tx_hdrs: list[list[int]] = [[0, 0], [0, 0]]
        name_parts = [
            _NAME_PART.pack(base + self._names + i * name_size, name_size)
            for i in range(b)
        ]
        self._iov_parts: list[list[bytes]] = []
        variant = 0
        for stamped, (iov, step, count) in enumerate(
            ((self._tx_iov, _IOVEC_SIZE, 1), (self._tx2_iov, 2 * _IOVEC_SIZE, 2))
        ):
            iov_parts = [_IOV_PART.pack(base + iov + j * step, count) for j in range(b)]
            self._iov_parts.append(iov_parts)
            for gaps in (0, 1):
                hdr = tx_start + variant * b * _MMSGHDR_SIZE
                variant += 1
                self._tx_hdrs[stamped][gaps] = hdr
                if not gaps:
                    records = b"".join(
                        name + part for name, part in zip(name_parts, iov_parts)
                    )
                    self._view[hdr : hdr + len(records)] = records
        self._name_parts = name_parts
        self._parts = [b""] * (2 * b)
        # Receive: only msg_controllen is consumed by the kernel (set to what
        # it used, 0 without a timestamp), so reset headers + control slots
        # before each call when timestamps are on; without them nothing the
        # kernel writes needs undoing.
        self._rx_template = bytes(self._view[:rx_reset_end])
        self._rx_reset = rx_reset_end if timestamps else 0
        self._tx_start = tx_start
        self._tx_template = bytes(
            self._view[tx_start : tx_start + 4 * b * _MMSGHDR_SIZE]
        )
        self._tx_dirty = False
        self._tx_key: tuple[int, ...] | None = None
        self._tx2_key: tuple[int, ...] | None = None

        # Reply bodies are joined and copied here; grown on demand.
        self._blob: Any = None
        self._blob_size = 0
        self._blob_addr = 0
        self._grow_blob(b * 64)

        self._lengths_structs = [_lengths_struct(max(i, 1)) for i in range(b + 1)]
        self._sources_structs = [
            _sources_struct(max(i, 1), family) for i in range(b + 1)
        ]
        self._control_structs = [_control_struct(max(i, 1)) for i in range(b + 1)]
        self._iovec_structs = [_iovec_struct(max(i, 1)) for i in range(2 * b + 1)]
        self._pair_flat = [
            [base + self._stamp, _STAMP_SIZE] * (2 * i) for i in range(b + 1)
        ]
        self._single_flat = [[0] * (2 * i) for i in range(b + 1)]
        # Data: one struct per length pattern seen twice (a flood repeats
        # its pattern; one-off patterns take the slicing path).
        self._data_structs: dict[tuple[int, ...], struct.Struct] = {}
        self._seen_once: set[tuple[int, ...]] = set()
        self._lengths: tuple[int, ...] = ()
        self._counted: tuple[int, ...] | None = None

        #: Datagrams received, truncated (seen by :meth:`data`), replies sent
        #: and dropped, and transient errors absorbed, since creation.
        self.received_count = 0
        self.truncated_count = 0
        self.sent_count = 0
        self.dropped_count = 0
        self.receive_errors = 0
        self.send_errors = 0
        self.last_errno = 0

    def _grow_blob(self, size: int) -> None:
        assert ctypes is not None
        self._tx_key = self._tx2_key = None  # iovecs point into the old one
        size = max(size, 2 * self._blob_size)
        self._blob = (ctypes.c_char * size)()
        self._blob_size = size
        self._blob_addr = ctypes.addressof(self._blob)

    def fileno(self) -> int:
        return self._fd

    # -- receiving ---------------------------------------------------------

    def receive(self) -> int:
        """One ``recvmmsg``: datagrams now in slots ``0..n-1``, 0 for none.

        Never blocks. ``EAGAIN``, ``EINTR`` and the errors a queued ICMP
        message or a momentary shortage report (``ECONNREFUSED``,
        ``ENOBUFS``, ...) are absorbed: the call drains the socket's error
        queue and tries once more, returning 0 if that fails too. Only
        errors about the socket itself (``EBADF``, ``ENOTSOCK``, ...) raise.
        """
        n = self._receive_once()
        return n if n > 0 else self._receive_failed()

    def _receive_once(self) -> int:
        """One ``recvmmsg`` into freshly reset slots; its raw result."""
        if self._rx_reset:
            self._memmove(self._base, self._rx_template, self._rx_reset)
        n: int = self._recvmmsg(self._fd, self._base, self.batch, _RECV_FLAGS, None)
        if n > 0:
            self._lengths = self._lengths_structs[n].unpack_from(self._mem)
            if not self.timestamps:
                self._now = self._clock()
            self.received_count += n
        return n

    def _receive_failed(self) -> int:
        err = self._get_errno()
        self._lengths = ()
        if err in _WOULD_BLOCK:
            return 0
        if err != errno.EINTR:
            if err in _FATAL_RECEIVE:
                raise OSError(err, f"recvmmsg: {os.strerror(err)}")
            self.receive_errors += 1
            self.last_errno = err
            self._drain_error_queue()
        n = self._receive_once()
        if n > 0:
            return n
        err = self._get_errno()
        if err not in _WOULD_BLOCK:
            self.receive_errors += 1
            self.last_errno = err
        return 0

    def _drain_error_queue(self) -> None:
        """Read away ICMP reports queued by ``IP_RECVERR``/``IPV6_RECVERR``.

        They count against the receive buffer, so left alone they would crowd
        out requests. Uses the receive slots, which hold nothing valid now.
        """
        for _ in range(4):
            got = self._recvmmsg(
                self._fd, self._base, self.batch, MSG_ERRQUEUE | MSG_DONTWAIT, None
            )
            if got < self.batch:
                break

    def lengths(self, n: int) -> tuple[int, ...]:
        """Real lengths of the datagrams in slots ``0..n-1`` (may exceed the slot)."""
        return self._lengths[:n]

    def truncated(self, n: int) -> list[int]:
        """Slots among ``0..n-1`` whose datagram was longer than *slot_size*."""
        size = self.slot_size
        return [i for i, length in enumerate(self._lengths[:n]) if length > size]

    def data(self, n: int) -> tuple[bytes, ...]:
        """The datagrams in slots ``0..n-1`` (cut to *slot_size*), as bytes."""
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
            if self._lengths is not self._counted:
                # Once per batch, however often its data is asked for.
                self._counted = self._lengths
                self.truncated_count += sum(1 for k in self._lengths if k > size)
            lengths = tuple([min(k, size) for k in lengths])
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
        """Packed source addresses and ports of slots ``0..n-1``.

        Addresses are 4 bytes on an ``AF_INET`` socket and 16 on an
        ``AF_INET6`` one, IPv4-mapped sources included (``::ffff:a.b.c.d``).
        """
        if not n:
            return (), ()
        flat: tuple[Any, ...] = self._sources_structs[n].unpack_from(
            self._mem, self._names
        )
        return flat[1::2], flat[0::2]

    def timespecs(self, n: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Kernel ``(tv_sec, tv_nsec)`` columns of slots ``0..n-1``.

        ``None`` when timestamps are off or any datagram of the batch lacks one.
        """
        if not self.timestamps or not n:
            return None
        flat: tuple[int, ...] = self._control_structs[n].unpack_from(
            self._mem, self._control
        )
        if flat[0::3].count(_TIMESTAMP_TAG) != n:
            return None
        return flat[1::3], flat[2::3]

    def received(self, n: int) -> list[float]:
        """Receive times of slots ``0..n-1`` as POSIX seconds.

        The kernel's ``SO_TIMESTAMPNS`` stamp when timestamps are on, else
        (and for any datagram without one) *clock* read once per batch.
        """
        if not self.timestamps:
            return [self._now] * n
        if not n:
            return []
        flat: tuple[int, ...] = self._control_structs[n].unpack_from(
            self._mem, self._control
        )
        if flat[0::3].count(_TIMESTAMP_TAG) == n:
            secs = flat[1::3]
            first = secs[0]
            if secs.count(first) == n:
                # One second for the whole batch (nearly always): float
                # arithmetic only, no int-to-float dispatch per datagram.
                whole = float(first)
                return [whole + ns * 1e-9 for ns in map(float, flat[2::3])]
            return [s + ns * 1e-9 for s, ns in zip(secs, flat[2::3])]
        fallback = self._clock()
        return [
            s + ns * 1e-9 if tag == _TIMESTAMP_TAG else fallback
            for tag, s, ns in zip(flat[0::3], flat[1::3], flat[2::3])
        ]

    def received_ns(self, n: int) -> list[int]:
        """Receive times of slots ``0..n-1`` as integer POSIX nanoseconds."""
        if not self.timestamps:
            return [round(self._now * 1e9)] * n
        if not n:
            return []
        flat: tuple[int, ...] = self._control_structs[n].unpack_from(
            self._mem, self._control
        )
        if flat[0::3].count(_TIMESTAMP_TAG) == n:
            return [s * 1_000_000_000 + ns for s, ns in zip(flat[1::3], flat[2::3])]
        fallback = round(self._clock() * 1e9)
        return [
            s * 1_000_000_000 + ns if tag == _TIMESTAMP_TAG else fallback
            for tag, s, ns in zip(flat[0::3], flat[1::3], flat[2::3])
        ]

    def messages(self, n: int) -> list[tuple[bytes, bytes, int, float]]:
        """``(data, packed address, port, receive time)`` per slot ``0..n-1``.

        Convenience; a loop over ``zip`` of the columns skips building the
        tuples.
        """
        addrs, ports = self.sources(n)
        return list(zip(self.data(n), addrs, ports, self.received(n)))

    # -- sending -----------------------------------------------------------

    def send(
        self,
        replies: Sequence[bytes | None],
        stamp: Callable[[], bytes] | None = None,
        unstamped: Collection[int] = (),
    ) -> int:
        """Send ``replies[i]`` to the source of slot *i*; ``None`` sends nothing.

        *replies* has at most as many entries as the last batch (it may be
        shorter: missing slots get no reply). All replies go out in one
        ``sendmmsg``; if the kernel takes only some, the rest are retried,
        a reply the kernel refuses on its own account is skipped, and on a
        full buffer (``EAGAIN``/``ENOBUFS``) the rest are dropped.

        With *stamp*, each reply's last 8 bytes are replaced by the value
        ``stamp()`` returns, called once right before ``sendmmsg`` (e.g. an
        NTP transmit timestamp); slots in *unstamped* (and replies shorter
        than 8 bytes) go out as given.

        Returns the number of replies dropped (not handed to the kernel).
        """
        k = len(replies)
        if not k:
            return 0
        if k > self.batch:
            raise ValueError(f"{len(replies)} replies for a batch of {self.batch}")
        if self._tx_dirty:
            # Undo the last send's gap and unstamped patches (lazily, so a
            # send that failed half-way cannot leave them in place).
            self._memmove(
                self._base + self._tx_start, self._tx_template, len(self._tx_template)
            )
            self._tx_dirty = False
        slots: list[int] | None = None
        items: Sequence[Any] = replies
        first = replies[0]
        # The iovecs depend only on the reply lengths (bodies are copied
        # back to back into one buffer) or, when every reply is the same
        # bytes, on their count and size: the layout key. An unchanged key
        # means the iovecs already written are right, which is the common
        # case under load (cached text replies, 48-byte NTP replies).
        key: tuple[int, ...]
        if type(first) is bytes and replies.count(first) == k:
            size = len(first)
            key = (-1, k, size)
            if size > self._blob_size:
                self._grow_blob(size)
            self._memmove(self._blob_addr, first, size)
        else:
            try:
                blob = b"".join(replies)  # type: ignore[arg-type]
            except TypeError:
                answered = list(map(operator.is_not, replies, _NONES))
                slots = list(itertools.compress(range(k), answered))
                items = list(itertools.compress(replies, answered))
                k = len(items)
                if not k:
                    return 0
                blob = b"".join(items)
                if slots[-1] == k - 1:
                    slots = None  # only trailing slots unanswered: no gaps
            key = tuple(map(len, items))
            size = len(blob)
            if size > self._blob_size:
                self._grow_blob(size)
            self._memmove(self._blob_addr, blob, size)

        if slots is None:
            hdr = self._tx_hdrs[stamp is not None][0]
        else:
            # Gaps: header j = name part of slot slots[j] + iovec part j.
            hdr = self._tx_hdrs[stamp is not None][1]
            parts = self._parts
            if len(parts) != 2 * k:
                parts = [b""] * (2 * k)
            parts[0::2] = map(self._name_parts.__getitem__, slots)
            parts[1::2] = self._iov_parts[stamp is not None][:k]
            records = b"".join(parts)
            self._memmove(self._base + hdr, records, len(records))
        if stamp is None:
            if key != self._tx_key:
                self._layout(key, k, None, slots, (), hdr)
        elif key != self._tx2_key or unstamped:
            self._layout(key, k, stamp, slots, unstamped, hdr)

        if stamp is not None:
            self._view[self._stamp : self._stamp + _STAMP_SIZE] = stamp()
        sent = self._sendmmsg(self._fd, self._base + hdr, k, MSG_DONTWAIT)
        dropped = 0
        if sent != k:
            dropped = self._send_rest(hdr, k, sent)
        self.sent_count += k - dropped
        self.dropped_count += dropped
        return dropped

    def _layout(
        self,
        key: tuple[int, ...],
        k: int,
        stamp: Callable[[], bytes] | None,
        slots: list[int] | None,
        unstamped: Collection[int],
        hdr: int,
    ) -> None:
        """Write the iovecs of *k* replies laid out as *key* says."""
        base = self._blob_addr
        lengths: list[int]
        if key[0] < 0:
            lengths = [key[2]] * k
            starts = [base] * k
        else:
            lengths = list(key)
            starts = list(itertools.accumulate(lengths, initial=base))
            del starts[-1]
        mem = self._mem
        if stamp is None:
            flat = self._single_flat[k]
            flat[0::2] = starts
            flat[1::2] = lengths
            self._iovec_structs[k].pack_into(mem, self._tx_iov, *flat)
            self._tx_key = key
            return
        flat = self._pair_flat[k]
        flat[0::4] = starts
        flat[1::4] = [x - _STAMP_SIZE for x in lengths]
        if unstamped or min(lengths) < _STAMP_SIZE:
            self._unstamp(flat, lengths, slots, unstamped, hdr)
            # The headers' iovlen patches go at the next send: rebuild then.
            self._tx2_key = None
        else:
            self._tx2_key = key
        self._iovec_structs[2 * k].pack_into(mem, self._tx2_iov, *flat)

    def _unstamp(
        self,
        flat: list[int],
        lengths: list[int],
        slots: list[int] | None,
        unstamped: Collection[int],
        hdr: int,
    ) -> None:
        """Send some replies of a stamped batch whole: iovlen 1, full length."""
        positions: set[int] = set()
        if unstamped:
            if slots is None:
                positions.update(i for i in unstamped if 0 <= i < len(lengths))
            else:
                where = {s: j for j, s in enumerate(slots)}
                positions.update(where[i] for i in unstamped if i in where)
        positions.update(j for j, x in enumerate(lengths) if x < _STAMP_SIZE)
        for j in positions:
            flat[4 * j + 1] = lengths[j]
            _U64.pack_into(self._mem, hdr + j * _MMSGHDR_SIZE + _IOVLEN_OFFSET, 1)
        self._tx_dirty = True

    def _send_rest(self, hdr: int, k: int, sent: int) -> int:
        """Finish a partial ``sendmmsg``; the number of replies dropped."""
        pos = 0
        dropped = 0
        retried = -1
        while True:
            if sent > 0:
                pos += sent
                if pos >= k:
                    return dropped
            else:
                err = self._get_errno()
                self.last_errno = err
                if err in _SEND_FULL:
                    self.send_errors += 1
                    return dropped + k - pos
                if err in _FATAL_SEND:
                    raise OSError(err, f"sendmmsg: {os.strerror(err)}")
                if retried == pos:
                    # Refused twice: this reply itself is the problem.
                    self.send_errors += 1
                    dropped += 1
                    pos += 1
                    if pos >= k:
                        return dropped
                else:
                    # A queued ICMP error may have been reported instead of
                    # this reply (the failed call consumed it), or EINTR:
                    # try it once more before blaming the reply.
                    retried = pos
            sent = self._sendmmsg(
                self._fd, self._base + hdr + pos * _MMSGHDR_SIZE, k - pos, MSG_DONTWAIT
            )


# ---------------------------------------------------------------------------
# Twisted


BatchHandler = Callable[[BatchSocket, int], "Sequence[bytes | None] | None"]
"""``(socket, n) -> replies or None``, called once per received batch.

The handler reads the columns it needs from the socket (``data(n)``,
``sources(n)``, ``received(n)``, ...) and either returns the slot-aligned
replies (``replies[i]`` answers slot *i*, ``None`` for no reply), which the
reader sends in one ``sendmmsg``, or sends them itself with
``socket.send(...)`` (to use ``stamp=``/``unstamped=``) and returns ``None``.
"""


@implementer(IReadDescriptor)
class FastReader:
    """Serve a :class:`BatchSocket` from the reactor: ``reactor.addReader``.

    Each ``doRead`` receives up to *max_batches* batches (or until the socket
    is empty), hands each to *handler* and sends what it returns, then yields
    to the reactor so other descriptors get their turn under a flood.

    A handler that raises, or returns replies ``send`` refuses (not bytes,
    more than the batch), costs its batch; the exception is counted in
    :attr:`handler_errors`, passed to *on_error* when given, and otherwise
    logged, at most once per 1000 errors. Replies the kernel would not take
    are counted in the socket's ``dropped_count``. Only a broken socket
    (``EBADF`` and the like) ends reading: ``doRead`` returns the failure
    and the reactor calls :meth:`connectionLost`.

    To serve a port Twisted bound (``reactor.listenUDP``, a ``UDPServer``
    service)::

        port.stopReading()                     # Twisted's own reads stop
        reader = FastReader(BatchSocket(port.socket), handler, reactor)
        reader.startReading()
        ...
        reader.stopReading()                   # before the port closes
        port.stopListening()
    """

    log = Logger()

    def __init__(
        self,
        sock: BatchSocket,
        handler: BatchHandler,
        reactor: Any = None,
        *,
        max_batches: int = DEFAULT_MAX_BATCHES,
        stamp: Callable[[], bytes] | None = None,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.socket = sock
        self.handler = handler
        self.reactor: IReactorFDSet = reactor
        self.max_batches = max_batches
        self.stamp = stamp
        self.on_error = on_error
        self.batches = 0
        self.handler_errors = 0
        self.reading = False
        self.lost: Failure | None = None

    def startReading(self) -> None:
        if not self.reading:
            self.reading = True
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        if self.reading:
            self.reading = False
            self.reactor.removeReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "udptime-fastpath"

    def doRead(self) -> Failure | None:
        sock = self.socket
        receive = sock.receive
        handler = self.handler
        send = sock.send
        stamp = self.stamp
        full = sock.batch
        batches = 0
        try:
            while batches < self.max_batches:
                n = receive()
                if not n:
                    break
                batches += 1
                try:
                    replies = handler(sock, n)
                    if replies:
                        send(replies, stamp)
                except Exception as exc:
                    # One bad batch must not stop the listener.
                    if isinstance(exc, OSError) and exc.errno in _FATAL_SEND:
                        raise
                    # Includes replies send() refuses (not bytes, too many).
                    self._handler_failed(exc)
                if n < full:
                    # The queue ran dry during that call: skip the recvmmsg
                    # that would only say EAGAIN; the reactor (level
                    # triggered) calls again for anything that came since.
                    break
        except OSError as exc:
            # The socket itself is broken (EBADF, ...): let the reactor drop us.
            self.batches += batches
            return Failure(exc)
        self.batches += batches
        return None

    def _handler_failed(self, exc: BaseException) -> None:
        self.handler_errors += 1
        if self.on_error is not None:
            self.on_error(exc)
        elif self.handler_errors % 1000 == 1:
            self.log.failure(
                "batch handler failed ({count} so far)",
                Failure(exc),
                count=self.handler_errors,
            )

    def connectionLost(self, reason: Failure) -> None:
        self.reading = False
        self.lost = reason
