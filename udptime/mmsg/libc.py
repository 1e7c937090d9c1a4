"""The C side of batched UDP I/O on Linux: struct layouts, formats, libc calls.

``recvmmsg``/``sendmmsg`` through ctypes with integer arguments. Struct
layouts (LP64 Linux: x86_64, aarch64; checked against ctypes at import)::

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

Everything imports on any platform; :func:`available` says whether the batch
path works here. Callers fall back to the portable Twisted path otherwise.
"""

from __future__ import annotations

import errno
import functools
import socket
import struct
import sys
from collections.abc import Callable

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython without ctypes
    ctypes = None  # type: ignore[assignment]

DEFAULT_BATCH = 64
DEFAULT_SLOT_SIZE = 2048

# <sys/socket.h>, Linux values (identical on x86_64 and aarch64).
MSG_TRUNC = 0x20
MSG_DONTWAIT = 0x40
MSG_ERRQUEUE = 0x2000
SO_TIMESTAMPNS = 35
SCM_TIMESTAMPNS = SO_TIMESTAMPNS

MMSGHDR_SIZE = 64
IOVEC_SIZE = 16
MSG_LEN_OFFSET = 56
IOVLEN_OFFSET = 24
#: CMSG_SPACE(sizeof(struct timespec)): header 16 + data 16.
CONTROL_SIZE = 32
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28
STAMP_SIZE = 8

#: Failures about the socket or the call itself, not about one datagram or
#: one queued ICMP report: these raise. Every other error is absorbed.
FATAL_RECEIVE = frozenset(
    {errno.EBADF, errno.ENOTSOCK, errno.EFAULT, errno.EINVAL, errno.ENOTCONN}
)
FATAL_SEND = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EFAULT})
WOULD_BLOCK = frozenset({errno.EAGAIN, errno.EWOULDBLOCK})
SEND_FULL = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})

HEADER = struct.Struct("=QI4xQQQQi4xI4x")
U64 = struct.Struct("=Q")
#: The two halves of a send mmsghdr: name pointer and length, then iovec
#: pointer and count with the zero control, flags and msg_len fields.
NAME_PART = struct.Struct("=QI4x")
IOV_PART = struct.Struct("=QQ32x")


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
        (MsgHdr, "iovlen"): IOVLEN_OFFSET,
        (MsgHdr, "control"): 32,
        (MsgHdr, "controllen"): 40,
        (MsgHdr, "flags"): 48,
        (MMsgHdr, "len"): MSG_LEN_OFFSET,
        (CMsgHdr, "type"): 12,
        (TimeSpec, "nsec"): 8,
    }
    for (cls, name), offset in expected.items():
        if getattr(cls, name).offset != offset:
            return False
    sizes = (
        ctypes.sizeof(IoVec) == IOVEC_SIZE
        and ctypes.sizeof(MsgHdr) == 56
        and ctypes.sizeof(MMsgHdr) == MMSGHDR_SIZE
        and ctypes.sizeof(CMsgHdr) == 16
        and ctypes.sizeof(TimeSpec) == 16
        and HEADER.size == MMSGHDR_SIZE
    )
    return sizes


class Libc:
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
def libc() -> Libc | None:
    if not sys.platform.startswith("linux") or not _layout_ok():
        return None
    try:
        return Libc()
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether the batch path works here: Linux, LP64, libc with both mmsg calls."""
    return libc() is not None


@functools.cache
def lengths_struct(n: int) -> struct.Struct:
    """msg_len of n consecutive mmsghdrs."""
    return struct.Struct("=" + "56xI4x" * n)


@functools.cache
def sources_struct(n: int, family: int) -> struct.Struct:
    """(port, address bytes) pairs from n consecutive name slots."""
    if family == socket.AF_INET6:
        return struct.Struct("!" + "2xH4x16s4x" * n)
    return struct.Struct("!" + "2xH4s8x" * n)


@functools.cache
def control_struct(n: int) -> struct.Struct:
    """(level and type as one int, tv_sec, tv_nsec) of n control slots' first cmsg."""
    return struct.Struct("=" + "8xqqq" * n)


#: cmsg_level SOL_SOCKET and cmsg_type SCM_TIMESTAMPNS read as one native
#: 64-bit integer: one comparison per datagram checks both.
TIMESTAMP_TAG: int = struct.unpack(
    "=q", struct.pack("=ii", socket.SOL_SOCKET, SCM_TIMESTAMPNS)
)[0]


@functools.cache
def iovec_struct(n: int) -> struct.Struct:
    """n consecutive iovecs (base, len)."""
    return struct.Struct("=" + "QQ" * n)
