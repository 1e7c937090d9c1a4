"""Per-listener counters: plain integers bumped on the hot path, read on demand."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    """What one listener has seen; metrics and summaries read these, nothing locks."""

    #: every datagram that reached the listener
    received: int = 0
    #: datagrams sent back, Kiss-o'-Death replies included
    answered: int = 0
    #: over a source's rate limit (dropped or kissed)
    rate_limited: int = 0
    #: refused by the access lists
    denied: int = 0
    #: no reply owed: malformed or not a request, loop guard
    ignored: int = 0
    #: Kiss-o'-Death replies sent (RATE, DENY)
    kisses: int = 0
    #: a responder raised (a bug, never a property of the datagram)
    errors: int = 0
    #: replies the kernel would not take (full buffer, unreachable)
    send_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
