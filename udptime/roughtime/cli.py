"""``udptime roughtime ...``: keys tooling, a server-list entry, and a
blocking client query.

    keygen --out FILE               new root key (0600), prints its public key
    delegate --root FILE --out FILE --days N
                                    an online key for this host, vouched for N days
    server-entry --name NAME --address PROTO:HOST:PORT ...
                 (--public-key B64 | --delegation FILE | --root FILE)
                                    this server's entry of an RFC 10049 server list
    query HOST [PORT] PUBLIC_KEY    one verified Roughtime measurement

Operator errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from udptime.roughtime import keys, verify, wire

DAY = 86_400
#: MINT lies this far before the moment of delegation, so that a serving
#: host whose clock is a little behind the signing machine's is still covered.
DEFAULT_BACKDATE = 3_600
#: Section 5: retry after 1 s, each wait 1.5 times the one before.
DEFAULT_TIMEOUT = 1.0
BACKOFF = 1.5
DEFAULT_ATTEMPTS = 3
_RECEIVE_SIZE = 65_535


class QueryError(Exception):
    """No valid reply: a timeout, or only replies that failed verification."""


@dataclass(frozen=True, slots=True)
class QueryResult:
    """A verified reply, the exchange that produced it, and local times
    (POSIX ns) around it, for an offset ``midpoint - (sent + received) / 2``."""

    verified: verify.Verified
    request: bytes
    response: bytes
    sent_ns: int
    received_ns: int

    @property
    def rtt(self) -> float:
        return (self.received_ns - self.sent_ns) / 1e9

    @property
    def offset(self) -> float:
        """Server minus local clock, seconds (rough: MIDP is whole seconds)."""
        local = (self.sent_ns + self.received_ns) / 2e9
        return self.verified.midpoint - local


def query(
    host: str,
    port: int,
    public_key: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = DEFAULT_ATTEMPTS,
    nonce: bytes | None = None,
    now_ns: Callable[[], int] = time.time_ns,
) -> QueryResult:
    """One Roughtime measurement over UDP, verified against *public_key*.

    The same request goes out up to *attempts* times, waiting *timeout*
    seconds, then 1.5 times longer after each silence. Replies from other
    addresses or that fail verification are skipped (grease, spoofing).
    """
    request = verify.make_request(nonce, public_key=public_key)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as e:
        raise QueryError(f"cannot resolve {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    last_error: verify.VerificationError | None = None
    with socket.socket(family, kind, proto) as sock:
        wait = timeout
        for _ in range(attempts):
            sent = now_ns()
            sock.sendto(request, address)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, source = sock.recvfrom(_RECEIVE_SIZE)
                except TimeoutError:
                    break
                received = now_ns()
                if source[:2] != address[:2]:
                    continue
                try:
                    verified = verify.verify_response(request, data, public_key)
                except verify.VerificationError as e:
                    last_error = e
                    continue
                return QueryResult(verified, request, data, sent, received)
            wait *= BACKOFF
    if last_error is not None:
        raise QueryError(f"no valid reply from {host}: {last_error}")
    raise QueryError(f"no reply from {host} port {port}")


def _public_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != wire.PUBLIC_KEY_SIZE:
        raise ValueError(f"not a base64 Ed25519 public key: {text!r}")
    return key


def _iso(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _keygen(args: argparse.Namespace) -> int:
    key = keys.generate_key()
    keys.write_root_key(Path(args.out), key, overwrite=args.force)
    print(base64.b64encode(keys.public_bytes(key)).decode("ascii"))
    return 0


def _delegate(args: argparse.Namespace) -> int:
    if args.days <= 0:
        raise ValueError("--days must be positive")
    root = keys.load_root_key(Path(args.root))
    now = int(time.time())
    mint = max(0, now - args.backdate)
    maxt = now + int(args.days * DAY)
    delegation = keys.delegate(root, mint, maxt)
    keys.write_delegation(Path(args.out), delegation)
    online = base64.b64encode(keys.public_bytes(delegation.online_key)).decode("ascii")
    print(f"online key {online} valid {_iso(mint)} .. {_iso(maxt)}")
    return 0


def _address(text: str) -> tuple[str, str, int]:
    protocol, sep, rest = text.partition(":")
    if not sep or protocol not in ("udp", "tcp"):
        raise ValueError(f"--address is udp:HOST:PORT or tcp:HOST:PORT, not {text!r}")
    if rest.startswith("[") and "]:" in rest:
        host, port = rest[1:].rsplit("]:", 1)
    else:
        host, _, port = rest.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad --address {text!r}")
    return protocol, host, int(port)


def _server_entry(args: argparse.Namespace) -> int:
    if args.public_key is not None:
        public_key = _public_key(args.public_key)
    elif args.delegation is not None:
        public_key = keys.load_delegation(Path(args.delegation)).root_public_key
    else:
        public_key = keys.public_bytes(keys.load_root_key(Path(args.root)))
    addresses = [_address(a) for a in args.address]
    entry = verify.server_entry(args.name, public_key, addresses)
    print(json.dumps(entry, indent=2))
    return 0


def _query(args: argparse.Namespace) -> int:
    result = query(
        args.host,
        args.port,
        _public_key(args.public_key),
        timeout=args.timeout,
        attempts=args.attempts,
    )
    verified = result.verified
    print(
        f"{_iso(verified.midpoint)} ±{verified.radius}s"
        f" (offset {result.offset:+.1f}s, rtt {result.rtt * 1000:.1f}ms,"
        f" version {verified.version:#x})"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="udptime roughtime", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)

    keygen = commands.add_parser("keygen", help="make a long-term root key")
    keygen.add_argument(
        "--out", required=True, help="private key file to create (0600)"
    )
    keygen.add_argument(
        "--force", action="store_true", help="overwrite an existing file"
    )
    keygen.set_defaults(run=_keygen)

    delegate = commands.add_parser("delegate", help="vouch for a fresh online key")
    delegate.add_argument("--root", required=True, help="root key file")
    delegate.add_argument(
        "--out", required=True, help="delegation file to write (0600)"
    )
    delegate.add_argument("--days", type=float, required=True, help="validity from now")
    delegate.add_argument(
        "--backdate",
        type=int,
        default=DEFAULT_BACKDATE,
        help="seconds MINT lies before now (default %(default)s)",
    )
    delegate.set_defaults(run=_delegate)

    entry = commands.add_parser("server-entry", help="print this server's list entry")
    entry.add_argument("--name", required=True)
    entry.add_argument(
        "--address", action="append", required=True, help="udp:HOST:PORT (repeatable)"
    )
    which = entry.add_mutually_exclusive_group(required=True)
    which.add_argument("--public-key", help="root public key, base64")
    which.add_argument("--delegation", help="this host's delegation file")
    which.add_argument("--root", help="root key file")
    entry.set_defaults(run=_server_entry)

    ask = commands.add_parser("query", help="one verified measurement")
    ask.add_argument("host")
    ask.add_argument("port", type=int, nargs="?", default=wire.DEFAULT_PORT)
    ask.add_argument("public_key", help="the server's root public key, base64")
    ask.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ask.add_argument("--attempts", type=int, default=DEFAULT_ATTEMPTS)
    ask.set_defaults(run=_query)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (keys.KeyFileError, QueryError, ValueError, OSError) as e:
        print(f"udptime roughtime {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
