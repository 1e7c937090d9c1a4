"""Microseconds per reply on the NTS paths of the ``ntp`` responder, and per
NTS-KE response (records and cookies, no TLS).

Run: ``python bench/nts_bench.py [ROUNDS]``. Cases are timed round-robin and
each reports its best round, keeping other load on the machine out of the
comparison. NTS replies are sealers (``udptime.core.Sealer``): each case
calls the sealer too, as the shell does right before the send. "post-stamp"
is the time from the transmit stamp's clock read to the finished reply (the
reply's own encryption), which a client sees as a one-way delay the server
did not account for. "batch of 64" is ``answer_batch`` over 64 NTS requests
and their 64 sealers, per reply.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from udptime.core import Reply
from udptime.ntp import ServerState
from udptime.nts import extensions as ext
from udptime.nts import records as rec
from udptime.nts.cookies import CookieKeys
from udptime.nts.ke import KeSettings, respond
from udptime.nts.responder import NtsResponder
from udptime.nts.testing import memory_keys
from udptime.responders.ntp import NtpResponder

PER_ROUND = 2_000
BATCH = 64
STATE = ServerState(0, 2, -20, 0.0, 0.001, b"LOCL", None)


def sealed(reply: Reply | None) -> bytes | None:
    return reply() if callable(reply) else reply


def sealed_all(replies: Sequence[Reply | None]) -> list[bytes | None]:
    return [sealed(r) for r in replies]


def main(rounds: int) -> None:
    store = memory_keys()
    stamps: list[float] = []

    def wall() -> int:
        stamps.append(time.perf_counter())
        return time.time_ns()

    responder = NtsResponder(NtpResponder(lambda: STATE, wall), store)
    keys = CookieKeys(15, os.urandom(32), os.urandom(32))
    c2s = AESSIV(keys.c2s)
    cookie = store.key_set.seal(keys, os.urandom(16))

    def request(placeholders: int) -> bytes:
        header = bytes([0x23, 0, 6]) + bytes(37) + os.urandom(8)
        return ext.build_request(
            header,
            os.urandom(32),
            cookie,
            c2s,
            os.urandom(16),
            placeholders=placeholders,
        )

    forged = bytearray(request(0))
    forged[-1] ^= 1
    plain = bytes([0x23, 0, 6]) + bytes(45)
    now = time.time_ns()

    def exporter(label: bytes, length: int, context: bytes) -> bytes:
        return hashlib.sha512(label + context).digest()[:length]

    ke_request = [
        rec.next_protocol([0]),
        rec.aead_algorithm([15]),
        rec.end_of_message(),
    ]
    one, eight, bad = request(0), request(7), bytes(forged)
    batch = [request(0) for _ in range(BATCH)]
    times = [now] * BATCH
    cases: dict[str, Callable[[], object]] = {
        "plain NTP (48 bytes)": lambda: responder.answer(plain, now),
        "NTS, 1 cookie (232 bytes)": lambda: sealed(responder.answer(one, now)),
        "NTS, 8 cookies (988 bytes)": lambda: sealed(responder.answer(eight, now)),
        "NTS NAK (bad authenticator)": lambda: responder.answer(bad, now),
        "NTS-KE response (8 cookies)": lambda: respond(
            ke_request, exporter, store.key_set, KeSettings(20123)
        ),
    }
    best = dict.fromkeys([*cases, f"NTS, batch of {BATCH} (per reply)"], float("inf"))
    post: list[float] = []
    for _ in range(rounds):
        for name, call in cases.items():
            start = time.perf_counter()
            for _ in range(PER_ROUND):
                call()
            best[name] = min(best[name], (time.perf_counter() - start) / PER_ROUND)
        start = time.perf_counter()
        for _ in range(PER_ROUND // BATCH):
            sealed_all(responder.answer_batch(batch, times)[0])
        per = (time.perf_counter() - start) / (PER_ROUND // BATCH * BATCH)
        name = f"NTS, batch of {BATCH} (per reply)"
        best[name] = min(best[name], per)
        for _ in range(PER_ROUND // 10):
            reply = responder.answer(one, now)
            stamps.clear()
            sealed(reply)
            post.append(time.perf_counter() - stamps[-1])
    for name, seconds in best.items():
        print(f"{name:32} {seconds * 1e6:8.2f} us")
    post.sort()
    print(f"{'NTS post-stamp (median)':32} {post[len(post) // 2] * 1e6:8.2f} us")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
