"""The text formats' responder: the reply changes once a second, not per datagram."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

from udptime.core import NS_PER_SECOND
from udptime.formats import REPLY_LENGTHS, looks_like_time_reply


class TextResponder:
    """Answers any datagram with the time as text (or RFC 868 bits).

    Stays silent for requests that are themselves time-server replies (see
    ``looks_like_time_reply``): answering them is how two servers ping-pong.
    A batch within one second whose requests have none of those lengths
    costs a constant number of Python operations: one cached reply, repeated.
    """

    __slots__ = ("_encode", "_reply", "_second")

    late_stamp = False
    echoes_anything = True
    kisses = False

    def __init__(self, encode: Callable[[int], bytes]) -> None:
        self._encode = encode
        self._second: int | None = None
        self._reply = b""

    def _at(self, second: int) -> bytes:
        if second != self._second:
            self._reply = self._encode(second)
            self._second = second
        return self._reply

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        second = received_ns // NS_PER_SECOND
        if len(request) in REPLY_LENGTHS and looks_like_time_reply(request, second):
            return None
        if second == self._second:
            return self._reply
        return self._at(second)

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Collection[int]]:
        n = len(requests)
        if n:
            second = min(received_ns) // NS_PER_SECOND
            if max(received_ns) // NS_PER_SECOND == second and REPLY_LENGTHS.isdisjoint(
                map(len, requests)
            ):
                return [self._at(second)] * n, ()
        return list(map(self.answer, requests, received_ns)), ()

    def stamp(self) -> bytes:
        raise NotImplementedError("text replies take no late stamp")

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        return None
