"""Sending a batch: one ``sendmmsg`` for every reply, a late stamp written last.

Replies go to the source of the slot they answer: the destination of each
send header is the kernel-written source address in the receiver's name
slot, so no address is converted either way. With ``stamp=``, the last 8
bytes of every reply but the complete ones come from one ``stamp()`` call
made right before ``sendmmsg`` (scatter-gather: one shared 8-byte buffer,
nothing written per reply), which is how an NTP server stamps its transmit
time as late as possible. :meth:`Sender.send_one` sends one reply on its
own, right after it was made (a signed reply that carries its own stamp).
"""

from __future__ import annotations

import itertools
import operator
import os
from collections.abc import Callable, Collection, Sequence
from typing import Any

from udptime.mmsg.libc import (
    FATAL_SEND,
    IOV_PART,
    IOVEC_SIZE,
    IOVLEN_OFFSET,
    MMSGHDR_SIZE,
    MSG_DONTWAIT,
    NAME_PART,
    SEND_FULL,
    STAMP_SIZE,
    U64,
    iovec_struct,
    libc,
)
from udptime.mmsg.receive import Receiver

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython without ctypes
    ctypes = None  # type: ignore[assignment]

_NONES = itertools.repeat(None)


class Sender:
    """Replies to the datagrams of a :class:`Receiver`'s last batch.

    Four arrays of send headers, ``[stamped][gaps]``. Without gaps reply *j*
    goes to the source of slot *j*: those arrays are constant (but for the
    patches of complete replies in a stamped batch, undone at the next
    send). With gaps, header *j* names slot ``slots[j]``: those arrays are
    assembled per send from prebuilt halves (name part per slot, iovec
    part per position). The iovecs depend only on the reply lengths, so an
    unchanged layout (the common case under load) writes none.
    """

    def __init__(self, receiver: Receiver) -> None:
        c = libc()
        assert c is not None and ctypes is not None
        self._sendmmsg = c.sendmmsg
        self._sendto = _sendto()
        self._names = receiver.names
        self._get_errno = c.get_errno
        self._memmove = c.memmove
        self._fd = receiver.fileno()
        self.batch = b = receiver.batch
        name_size = receiver.name_size
        tx_iov = 4 * b * MMSGHDR_SIZE
        tx2_iov = tx_iov + b * IOVEC_SIZE
        stamp = tx2_iov + b * 2 * IOVEC_SIZE
        self._mem = mem = (ctypes.c_char * (stamp + STAMP_SIZE))()
        self._view = memoryview(mem).cast("B")
        base = ctypes.addressof(mem)
        self._base = base
        self._tx_iov = tx_iov
        self._tx2_iov = tx2_iov
        self._stamp = stamp
        self._tx_hdrs: list[list[int]] = [[0, 0], [0, 0]]
        name_parts = [
            NAME_PART.pack(receiver.names + i * name_size, name_size) for i in range(b)
        ]
        self._iov_parts: list[list[bytes]] = []
        variant = 0
        for stamped, (iov, step, count) in enumerate(
            ((tx_iov, IOVEC_SIZE, 1), (tx2_iov, 2 * IOVEC_SIZE, 2))
        ):
            iov_parts = [IOV_PART.pack(base + iov + j * step, count) for j in range(b)]
            self._iov_parts.append(iov_parts)
            for gaps in (0, 1):
                hdr = variant * b * MMSGHDR_SIZE
                variant += 1
                self._tx_hdrs[stamped][gaps] = hdr
                if not gaps:
                    records = b"".join(
                        name + part for name, part in zip(name_parts, iov_parts)
                    )
                    self._view[hdr : hdr + len(records)] = records
        self._name_parts = name_parts
        self._name_size = name_size
        self._parts = [b""] * (2 * b)
        self._tx_start = 0
        self._tx_template = bytes(self._view[: 4 * b * MMSGHDR_SIZE])
        self._tx_dirty = False
        self._tx_key: tuple[int, ...] | None = None
        self._tx2_key: tuple[int, ...] | None = None
        # Reply bodies are joined and copied here; grown on demand.
        self._blob: Any = None
        self._blob_size = 0
        self._blob_addr = 0
        self._grow_blob(b * 64)
        self._iovec_structs = [iovec_struct(max(i, 1)) for i in range(2 * b + 1)]
        self._pair_flat = [[base + stamp, STAMP_SIZE] * (2 * i) for i in range(b + 1)]
        self._single_flat = [[0] * (2 * i) for i in range(b + 1)]
        #: replies handed to the kernel and dropped, and send errors, since creation
        self.sent_count = 0
        self.dropped_count = 0
        self.send_errors = 0
        self.last_errno = 0

    def _grow_blob(self, size: int) -> None:
        assert ctypes is not None
        self._tx_key = self._tx2_key = None  # iovecs point into the old one
        size = max(size, 2 * self._blob_size)
        self._blob = (ctypes.c_char * size)()
        self._blob_size = size
        self._blob_addr = ctypes.addressof(self._blob)

    def send(
        self,
        replies: Sequence[bytes | None],
        stamp: Callable[[], bytes] | None = None,
        complete: Collection[int] = (),
    ) -> int:
        """Send ``replies[i]`` to the source of slot *i*; ``None`` sends nothing.

        *replies* has at most as many entries as the last batch (it may be
        shorter: missing slots get no reply). All replies go out in one
        ``sendmmsg``; if the kernel takes only some, the rest are retried,
        a reply the kernel refuses on its own account is skipped, and on a
        full buffer (``EAGAIN``/``ENOBUFS``) the rest are dropped.

        With *stamp*, each reply's last 8 bytes are replaced by the value
        ``stamp()`` returns, called once right before ``sendmmsg`` (e.g. an
        NTP transmit timestamp); slots in *complete* (and replies shorter
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
        # (The last reply first: distinct replies then cost one comparison.)
        if type(first) is bytes and replies[-1] == first and replies.count(first) == k:
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
        elif key != self._tx2_key or complete:
            self._layout(key, k, stamp, slots, complete, hdr)

        if stamp is not None:
            self._view[self._stamp : self._stamp + STAMP_SIZE] = stamp()
        sent = self._sendmmsg(self._fd, self._base + hdr, k, MSG_DONTWAIT)
        dropped = 0
        if sent != k:
            dropped = self._send_rest(hdr, k, sent)
        self.sent_count += k - dropped
        self.dropped_count += dropped
        return dropped

    def send_one(self, slot: int, reply: bytes) -> int:
        """Send *reply* alone to the source of *slot* of the last batch, now.

        One ``sendto`` straight from the bytes object (no copy, no header to
        write). Errors are handled as in :meth:`send`. Returns 1 if the reply
        was dropped, else 0.
        """
        if not 0 <= slot < self.batch:
            raise ValueError(f"slot {slot} outside a batch of {self.batch}")
        size = self._name_size
        name = self._names + slot * size
        retried = False
        while self._sendto(self._fd, reply, len(reply), MSG_DONTWAIT, name, size) < 0:
            err = self._get_errno()
            self.last_errno = err
            if err in FATAL_SEND:
                raise OSError(err, f"sendto: {os.strerror(err)}")
            if err in SEND_FULL or retried:
                self.send_errors += 1
                self.dropped_count += 1
                return 1
            retried = True  # a queued ICMP error or EINTR: once more, as in send
        self.sent_count += 1
        return 0

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
        flat[1::4] = [x - STAMP_SIZE for x in lengths]
        if unstamped or min(lengths) < STAMP_SIZE:
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
        positions.update(j for j, x in enumerate(lengths) if x < STAMP_SIZE)
        for j in positions:
            flat[4 * j + 1] = lengths[j]
            U64.pack_into(self._mem, hdr + j * MMSGHDR_SIZE + IOVLEN_OFFSET, 1)
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
                if err in SEND_FULL:
                    self.send_errors += 1
                    return dropped + k - pos
                if err in FATAL_SEND:
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
                self._fd, self._base + hdr + pos * MMSGHDR_SIZE, k - pos, MSG_DONTWAIT
            )


def _sendto() -> Callable[[int, bytes, int, int, int, int], int]:
    """libc ``sendto`` taking the reply as a bytes object (passed, not copied)."""
    assert ctypes is not None
    send = ctypes.PyDLL(None, use_errno=True).sendto
    send.argtypes = (
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_uint32,
    )
    send.restype = ctypes.c_ssize_t
    sendto: Callable[[int, bytes, int, int, int, int], int] = send
    return sendto
