"""ns per ``Policy.admit`` call on the paths a busy server takes most.

Run: ``python bench/policy_micro.py [ROUNDS]``. Cases are timed round-robin
and each reports its best round, which keeps scheduler noise and other load
on the machine out of the comparison; subtract the empty-call line for the
policy's own cost.
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence

from udptime.policy import ANSWER, Decision, Network, Policy, RateLimit

SOURCES = 10_000
PER_ROUND = 100_000

Batch = list[tuple[bytes, int]]

ALLOW = ["10.0.0.0/8", "192.168.0.0/16", "2001:db8::/32", "fd00::/8"]
DENY = ["10.66.0.0/16", "10.99.1.0/24", "2001:db8:bad::/48", "203.0.113.7"]


def sources(count: int, v6: bool = False) -> Batch:
    """Distinct random sources inside the allowed networks above."""
    rng = random.Random(1)
    prefix = b"\x20\x01\x0d\xb8" if v6 else b"\x0a"
    size = 12 if v6 else 3
    seen: dict[bytes, int] = {}
    while len(seen) < count:
        packed = prefix + rng.randbytes(size)
        seen[packed] = rng.randrange(1024, 65536)
    return list(seen.items())


class Case:
    """One policy fed one batch; ``run`` returns ns per call for one round."""

    def __init__(
        self,
        name: str,
        batch: Batch,
        policy: Policy | None = None,
        fresh: Callable[[], Policy] | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.fresh = fresh
        self.batch = (batch * (PER_ROUND // len(batch) + 1))[:PER_ROUND]
        self.now = 1.7e9
        self.best = float("inf")

    def run(self) -> None:
        # A new policy per round (evicting case) or 100 s between rounds, so
        # every bucket is full again and the ANSWER path is what is timed.
        policy = self.fresh() if self.fresh is not None else self.policy
        self.now += 100.0
        batch, now = self.batch, self.now
        if policy is None:
            empty = _empty
            start = time.perf_counter_ns()
            for packed, port in batch:
                empty(packed, port, now, False, True)
        else:
            admit = policy.admit
            start = time.perf_counter_ns()
            for packed, port in batch:
                admit(packed, port, now, False, True)
        self.best = min(self.best, (time.perf_counter_ns() - start) / len(batch))

    def decisions(self) -> str:
        policy = self.fresh() if self.fresh is not None else self.policy
        if policy is None:
            return ""
        tally = Counter(
            policy.admit(p, port, 0.0, False, True).name for p, port in self.batch
        )
        return ", ".join(f"{k} {v / len(self.batch):.1%}" for k, v in tally.items())


def _empty(packed: bytes, port: int, now: float, k: bool, e: bool) -> Decision:
    return ANSWER


def _evicting() -> Policy:
    """A full table, so every new source evicts the oldest."""
    policy = Policy(RateLimit(10, 50))
    for i in range(policy.table_size):
        policy.admit(b"\x0b" + i.to_bytes(3, "big"), 5000, 0.0, False, True)
    return policy


def main(argv: Sequence[str]) -> None:
    rounds = int(argv[1]) if len(argv) > 1 else 15
    v4, v6 = sources(SOURCES), sources(SOURCES, v6=True)
    fine: list[str | Network] = [*DENY, "2001:db8::1"]
    limit = RateLimit(10, 50)
    cases = [
        Case("empty function call (overhead)", v4),
        Case("policy off (no limit, no ACL)", v4, Policy(None)),
        Case("rate limit, 10k IPv4 sources", v4, Policy(limit)),
        Case("rate limit, 10k IPv6 sources", v6, Policy(limit)),
        Case("rate limit + ACL, 10k IPv4", v4, Policy(limit, allow=ALLOW, deny=DENY)),
        Case("rate limit + ACL, 10k IPv6", v6, Policy(limit, allow=ALLOW, deny=DENY)),
        Case("ACL only (no limit), 10k IPv4", v4, Policy(None, allow=ALLOW, deny=DENY)),
        Case(
            "rate limit + ACL with a /128, IPv6",
            v6,
            Policy(limit, allow=ALLOW, deny=fine),
        ),
        Case("one source flooding (over limit)", v4[:1], Policy(limit)),
        Case(
            "new source every call (evicting)",
            sources(PER_ROUND),
            fresh=_evicting,
        ),
    ]
    for _ in range(rounds):
        for case in cases:
            case.run()
    for case in cases:
        print(f"{case.name:36s} {case.best:7.1f} ns/call   {case.decisions()}")


if __name__ == "__main__":
    main(sys.argv)
