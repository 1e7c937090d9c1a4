"""Roughtime load for the benchmark: a file of valid requests of the
minimum size for ``loadgen --payload-file``, the server's root key, the
independent peer server, and udptime's signature counters.

Every request is a 1024-byte packet (RFC 10049 section 5.1's minimum) with
its own random nonce and no SRV, so udptime and the peer answer the same
load. Servers keep no per-request state, so cycling over a fixed set of
requests costs them as much as fresh ones: each batch is a new Merkle tree
and a new signature.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import sys
import urllib.request
from pathlib import Path

from udptime.roughtime import keys, wire

#: Requests written to the payload file; the load generator cycles over them.
DEFAULT_REQUESTS = 64
PACKET_SIZE = wire.MIN_REQUEST_SIZE
#: Where CI's .ci/run installs roughly (Python 3.12); UDPTIME_ROUGHTIME_PEER
#: overrides it, as for the interop tests.
PEER_VENV = ".venv-roughtime"
PEER_ENV = "UDPTIME_ROUGHTIME_PEER"


def make_request() -> bytes:
    """One valid request whose whole packet is exactly 1024 bytes."""
    request = wire.encode_request(
        os.urandom(wire.NONCE_SIZE), size=PACKET_SIZE - wire.FRAME_SIZE
    )
    assert len(request) == PACKET_SIZE
    return request


def write_requests(path: Path, count: int = DEFAULT_REQUESTS) -> None:
    """*count* requests as loadgen records (2-byte big-endian length, bytes)."""
    with open(path, "wb") as f:
        for _ in range(count):
            request = make_request()
            f.write(struct.pack("!H", len(request)) + request)


def write_root_key(workdir: Path) -> Path:
    path = workdir / "roughtime-root.pem"
    keys.write_root_key(path, keys.generate_key(), overwrite=True)
    return path


def peer_python(repo: Path) -> str | None:
    """The Python that has ``roughly``, or ``None``."""
    named = os.environ.get(PEER_ENV)
    if named:
        return named if shutil.which(named) or os.access(named, os.X_OK) else None
    local = repo / PEER_VENV / "bin" / "python"
    return str(local) if os.access(local, os.X_OK) else None


def peer_command(python: str, host: str, port: int) -> list[str]:
    """roughly's own server (asyncio, a 5 ms batching window), ungreased."""
    return [
        python, "-c", "from roughly.cli import cli; cli()", "server", "run",
        "--host", host, "--port", str(port), "--no-grease",
    ]  # fmt: skip


_SAMPLE = re.compile(
    r"^(udptime_roughtime_signatures_total|udptime_roughtime_batch_size_count"
    r"|udptime_roughtime_batch_size_sum)\{[^}]*\} ([0-9.e+]+)$",
    re.MULTILINE,
)


def scrape(host: str, port: int, timeout: float = 5.0) -> dict[str, float] | None:
    """udptime's Roughtime counters from its /metrics, or ``None``."""
    try:
        with urllib.request.urlopen(
            f"http://{host}:{port}/metrics", timeout=timeout
        ) as response:
            text = response.read().decode()
    except OSError as exc:
        print(f"bench: scraping roughtime metrics failed: {exc}", file=sys.stderr)
        return None
    values: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        values[name] = values.get(name, 0.0) + float(value)
    return values or None


def rates(
    before: dict[str, float] | None, after: dict[str, float] | None, seconds: float
) -> dict[str, float] | None:
    """Signatures per second and the mean batch size between two scrapes."""
    if before is None or after is None or seconds <= 0:
        return None

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    signatures = delta("udptime_roughtime_signatures_total")
    batches = delta("udptime_roughtime_batch_size_count")
    leaves = delta("udptime_roughtime_batch_size_sum")
    return {
        "signatures_per_s": round(signatures / seconds, 1),
        "mean_batch": round(leaves / batches, 2) if batches else 0.0,
        "signatures": signatures,
    }
