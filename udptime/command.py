"""The ``udptime`` command: ``udptime query ...`` and ``udptime roughtime ...``.

Dispatch only: the NTP and text formats are ``udptime.client``'s, Roughtime
queries ``udptime.roughtime.query``'s (which builds on the client), and the
Roughtime key tools ``udptime.roughtime.cli``'s.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.error import CannotListenError

from udptime import client
from udptime.client import EXIT_NO_REPLY, QueryError, emit
from udptime.roughtime import cli as roughtime_cli
from udptime.roughtime import query as roughtime_query


async def _run(reactor: Any, args: argparse.Namespace) -> None:
    if args.format != "roughtime":
        await client.run(reactor, args)
        return
    try:
        text, trouble = await roughtime_query.run(reactor, args)
    except (QueryError, CannotListenError, OSError) as exc:
        sys.stderr.write(f"udptime: {exc}\n")
        raise SystemExit(EXIT_NO_REPLY) from None
    emit(text)
    if trouble is not None:
        sys.stderr.write(f"udptime: {trouble}\n")
        raise SystemExit(EXIT_NO_REPLY)


def main(argv: Sequence[str] | None = None) -> None:
    """``udptime ...``; exit statuses as in ``udptime.client.EXIT_STATUSES``."""
    from twisted.internet import task

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["roughtime"]:  # its own parser, --help included
        raise SystemExit(roughtime_cli.main(argv[1:]))
    args = client.parser().parse_args(argv)
    problem = roughtime_query.check_args(args)
    if problem is None and args.host is None and args.servers is None:
        problem = "HOST is required"
    if problem is not None:
        args.usage_error(problem)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(_run(reactor, args)))
