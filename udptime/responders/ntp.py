"""The ``ntp`` format's responder: request bytes and receive time to a reply.

Pure: the clock state and the wall clock are callables handed in by the
wiring (``udptime.clockstate`` reads the kernel; tests pass plain values).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Collection, Sequence

from udptime.ntp import (
    MIN_POLL,
    PACKET_SIZE,
    REPLY_FROM_HEAD,
    REPLY_UNSTAMPED,
    ReplyHeads,
    ServerState,
    check_min_poll,
    fixed_from_ns,
    fixed_from_ns_many,
    kiss_reply,
    ntp_from_ns,
    request_fields,
    split_packets,
    unstamped_replies,
)

_repeat = itertools.repeat


class NtpResponder:
    """NTPv4/SNTP server mode from a clock state and a wall clock.

    :meth:`answer` reads the transmit stamp last, just before packing. A
    batch shares one clock state read, and its replies leave the transmit
    stamp to the shell, which writes one :meth:`stamp` into all of them
    right before the send: later than any per-reply read could be.
    """

    __slots__ = ("_heads", "_min_poll", "_state", "_wall_clock_ns")

    late_stamp = True
    echoes_anything = False
    kisses = True

    def __init__(
        self,
        state: Callable[[], ServerState],
        wall_clock_ns: Callable[[], int],
        *,
        min_poll: int = MIN_POLL,
    ) -> None:
        check_min_poll(min_poll)
        self._state = state
        self._wall_clock_ns = wall_clock_ns
        self._min_poll = min_poll
        self._heads = ReplyHeads(state(), min_poll)

    def _current_heads(self) -> ReplyHeads:
        """The reply heads for the current clock state, rebuilt when it changed."""
        state = self._state()
        heads = self._heads
        if state is not heads.state:
            if state == heads.state:
                heads.state = state
            else:
                heads = self._heads = ReplyHeads(state, self._min_poll)
        return heads

    def head(self, request: bytes) -> bytes | None:
        """Reply bytes 0-23 for *request*, or ``None`` when it is to be ignored."""
        if len(request) < PACKET_SIZE:
            return None
        heads = self._current_heads()
        head = heads.table.get(request[0] << 8 | request[2])
        if head is None:
            return heads.fill(request[0], request[2])
        return head

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        head = self.head(request)
        if head is None:
            return None
        return REPLY_FROM_HEAD.pack(
            head,
            request[40:48],
            fixed_from_ns(received_ns),
            fixed_from_ns(self._wall_clock_ns()),
        )

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Collection[int]]:
        """Replies to a batch, their transmit stamps left to the shell.

        48-byte requests, the common case, take a constant number of Python
        operations: one unpack of their header fields, one comparison for a
        batch that shares one header (else one lookup ``map``), the receive
        stamps in ``map`` passes and one pack of all the replies. Other
        lengths are answered one by one.
        """
        n = len(requests)
        if not n:
            return [], ()
        lengths = list(map(len, requests))
        if lengths.count(PACKET_SIZE) == n:
            return self._plain(requests, received_ns), ()
        plain = list(
            itertools.compress(
                range(n), map(operator.eq, lengths, _repeat(PACKET_SIZE))
            )
        )
        replies: list[bytes | None] = [None] * n
        if plain:
            pick = requests.__getitem__
            at = received_ns.__getitem__
            for i, reply in zip(
                plain, self._plain(list(map(pick, plain)), list(map(at, plain)))
            ):
                replies[i] = reply
        heads = self._current_heads()
        pack = REPLY_UNSTAMPED.pack
        for i, length in enumerate(lengths):
            if length > PACKET_SIZE:
                request = requests[i]
                head = heads.table.get(request[0] << 8 | request[2])
                if head is None:
                    head = heads.fill(request[0], request[2])
                if head is not None:
                    replies[i] = pack(
                        head, request[40:48], fixed_from_ns(received_ns[i])
                    )
        return replies, ()

    def _plain(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> list[bytes | None]:
        """Unstamped replies to 48-byte requests, ``None`` for those ignored."""
        n = len(requests)
        heads = self._current_heads()
        fields = request_fields(n).unpack(b"".join(requests))
        firsts = fields[0::3]
        polls = fields[1::3]
        first, poll = firsts[0], polls[0]
        ignored: list[int] = []
        column: list[bytes | None]
        if firsts.count(first) == n and polls.count(poll) == n:
            head = heads.table.get(first << 8 | poll)
            if head is None:
                head = heads.fill(first, poll)
                if head is None:
                    return [None] * n
            column = [head] * n
        else:
            keys = map(operator.or_, map(operator.lshift, firsts, _repeat(8, n)), polls)
            column = list(map(heads.table.get, keys))
            if None in column:
                for i, head in enumerate(column):
                    if head is None:
                        head = heads.fill(firsts[i], polls[i])
                        if head is None:
                            ignored.append(i)
                            head = bytes(24)
                        column[i] = head
        flat: list[object] = [None] * (3 * n)
        flat[0::3] = column
        flat[1::3] = fields[2::3]
        flat[2::3] = fixed_from_ns_many(received_ns)
        replies: list[bytes | None] = list(
            split_packets(n).unpack(unstamped_replies(n).pack(*flat))
        )
        for i in ignored:
            replies[i] = None
        return replies

    def stamp(self) -> bytes:
        return ntp_from_ns(self._wall_clock_ns())

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        return kiss_reply(request, why)
