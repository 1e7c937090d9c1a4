"""Per-listener counters: plain integers bumped on the hot path, read on demand."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class Counters:
    """What one listener has seen; metrics and summaries read these, nothing locks."""

    received: int = 0
    answered: int = 0
    ignored: int = 0
    errors: int = 0
    send_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        return asdict(self)
