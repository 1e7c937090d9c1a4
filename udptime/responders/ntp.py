"""The ``ntp`` format's responder: request bytes and receive time to a reply.

Pure: the clock state and the wall clock are callables handed in by the
wiring (``udptime.clockstate`` reads the kernel; tests pass plain values).
"""

from __future__ import annotations

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
    kiss_reply,
    ntp_from_ns,
)


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
        heads = self._current_heads()
        get = heads.table.get
        fill = heads.fill
        pack = REPLY_UNSTAMPED.pack
        replies: list[bytes | None] = []
        append = replies.append
        for request, ns in zip(requests, received_ns):
            if len(request) < PACKET_SIZE:
                append(None)
                continue
            head = get(request[0] << 8 | request[2])
            if head is None:
                head = fill(request[0], request[2])
                if head is None:
                    append(None)
                    continue
            append(pack(head, request[40:48], fixed_from_ns(ns)))
        return replies, ()

    def stamp(self) -> bytes:
        return ntp_from_ns(self._wall_clock_ns())

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        return kiss_reply(request, why)
