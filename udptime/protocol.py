"""The Twisted glue: a datagram in, the policy's verdict, the format's reply out."""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, LogLevel

from udptime.counters import Counters, LatencyHistogram
from udptime.fastpath import BatchSocket
from udptime.formats import Format, Responder
from udptime.logthrottle import LogThrottle
from udptime.ntp import KISS_DENY, KISS_RATE, PACKET_SIZE, to_ntp
from udptime.policy import (
    ANSWER,
    DENY,
    DENY_KISS,
    DROP,
    IGNORE,
    KISS,
    Decision,
    Policy,
    PolicyError,
    pack_host,
)


class TimeProtocol(DatagramProtocol):
    """Answer each admitted datagram with what the format's responder makes of it.

    :meth:`answer` is the whole per-datagram decision and is shared by the
    portable path (``datagramReceived``, one ``sendto`` per reply) and the
    Linux batch path (``udptime.fastpath``), which hands it packed source
    addresses and kernel receive times instead of ``(host, port)`` tuples.

    Errors from the network are data: a responder that raises or a send that
    fails costs that one reply, is counted, and is logged through a throttle
    so a flood cannot fill the disk. The listener never stops for them.
    """

    log = Logger()
    noisy = False

    def __init__(
        self,
        fmt: Format,
        responder: Responder,
        clock: IReactorTime,
        *,
        policy: Policy | None = None,
        verbose: bool = False,
        counters: Counters | None = None,
    ) -> None:
        self.format_name = fmt.name
        self._respond = responder
        self._kiss = fmt.kiss
        self._echoes = fmt.echoes_anything
        self._can_kiss = fmt.kiss is not None
        #: kernel receive timestamps and a late transmit stamp (NTP)
        self.stamps_time = fmt.stamps_time
        #: per-batch responder factory of the fast path, where the format has one
        self._respond_batch: Callable[[], Responder] | None = getattr(
            responder, "batch", None
        )
        #: replies may be longer than a bare NTP packet (NTS extension fields)
        self._long_replies = bool(getattr(responder, "long_replies", False))
        self._clock = clock
        self.policy = policy
        self.verbose = verbose
        self.counters = counters if counters is not None else Counters()
        #: receive-to-send histogram, kept only when metrics are served
        self.latency: LatencyHistogram | None = None
        self._error_log = LogThrottle(clock)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        host, port = addr[0], addr[1]
        try:
            packed = pack_host(host)
        except PolicyError:  # not an IP source: nothing we could answer safely
            self.counters.received += 1
            self.counters.ignored += 1
            return
        received = self._clock.seconds()
        reply = self.answer(datagram, packed, port, received)
        if reply is None:
            return
        transport = self.transport
        assert transport is not None, "datagram before makeConnection"
        try:
            transport.write(reply, addr)
        except OSError as exc:
            # EAGAIN/ENOBUFS on a full send buffer, EMSGSIZE, unreachable
            # networks: this reply is lost, the next datagram is served.
            self.counters.send_errors += 1
            self.throttled_error("sending a reply failed: {error!r}", exc, packed, port)
            return
        self.counters.answered += 1
        if self.latency is not None:
            self.latency.observe(self._clock.seconds() - received)

    def answer(
        self, datagram: bytes, packed: bytes, port: int, received: float
    ) -> bytes | None:
        """The reply owed to one datagram from *packed*:*port*, or ``None``.

        Counts every verdict except the send itself, which the caller counts
        (``answered`` or ``send_errors``) once it knows how the send went.
        """
        self.counters.received += 1
        return self._decide(self._respond, datagram, packed, port, received)

    def _decide(
        self,
        respond: Responder,
        datagram: bytes,
        packed: bytes,
        port: int,
        received: float,
    ) -> bytes | None:
        policy = self.policy
        if policy is not None:
            verdict = policy.admit(packed, port, received, self._can_kiss, self._echoes)
            if verdict is not ANSWER:
                return self._refuse(verdict, datagram, packed, port)
        return self._answer_one(respond, datagram, packed, port, received)

    def answer_batch(self, batch: BatchSocket, n: int) -> None:
        """The Linux fast path: answer *n* datagrams received into *batch*.

        Same decisions as :meth:`answer`, fed with packed addresses and
        kernel receive times; all replies leave in one ``sendmmsg``. Formats
        that stamp time build their replies without a transmit timestamp (a
        responder's ``batch()``) and every 48-byte reply gets one clock read
        made right before that call.
        """
        counters = self.counters
        counters.received += n
        kisses = counters.kisses
        respond = self._respond_batch() if self._respond_batch else self._respond
        addrs, ports = batch.sources(n)
        received = batch.received(n)
        cut_before = batch.truncated_count
        data = batch.data(n)
        if batch.truncated_count != cut_before and not self._echoes:
            # Longer than a slot: a format that reads the content (NTP, NTS)
            # must not answer a part of it; it gets an empty datagram, which
            # it ignores. Text replies do not depend on the content.
            cut = set(batch.truncated(n))
            data = tuple(b"" if i in cut else d for i, d in enumerate(data))
        replies = self._decide_batch(respond, data, addrs, ports, received)
        count = n - replies.count(None)
        if not count:
            return
        stamp = None
        unstamped: list[int] = []
        if self.stamps_time:
            stamp = self._transmit_stamp
            if kisses != counters.kisses or self._long_replies:
                # Kisses keep the times they were built with; longer replies
                # (NTS) end in extension fields, not a transmit timestamp.
                unstamped = [
                    i
                    for i, r in enumerate(replies)
                    if r and (len(r) != PACKET_SIZE or r[1] == 0)
                ]
        dropped = batch.send(replies, stamp, unstamped)
        counters.answered += count - dropped
        if dropped:
            counters.send_errors += dropped
        latency = self.latency
        if latency is not None:
            sent = self._clock.seconds()
            for reply, moment in zip(replies, received, strict=True):
                if reply is not None:
                    latency.observe(sent - moment)

    def _decide_batch(
        self,
        respond: Responder,
        data: Sequence[bytes],
        addrs: Sequence[bytes],
        ports: Sequence[int],
        received: Sequence[float],
    ) -> list[bytes | None]:
        """:meth:`_decide` for a whole batch, in a few C-level loops.

        Under load nearly every datagram is admitted and answered, so the
        common case is one ``map`` over the policy and one over the
        responder; anything else (refusals, a responder that raises,
        ``--verbose``) takes the per-datagram path for the datagrams concerned.
        """
        n = len(data)
        policy = self.policy
        if self.verbose:
            return list(
                map(self._decide, repeat(respond, n), data, addrs, ports, received)
            )
        if policy is not None:
            verdicts = list(
                map(
                    policy.admit,
                    addrs,
                    ports,
                    received,
                    repeat(self._can_kiss, n),
                    repeat(self._echoes, n),
                )
            )
            if verdicts.count(ANSWER) != n:
                return [
                    self._answer_one(respond, d, a, p, t)
                    if v is ANSWER
                    else self._refuse(v, d, a, p)
                    for v, d, a, p, t in zip(verdicts, data, addrs, ports, received)
                ]
        try:
            replies: list[bytes | None] = list(map(respond, data, received))
        except Exception:  # noqa: BLE001 - redone one by one below, errors counted there
            return list(
                map(self._answer_one, repeat(respond, n), data, addrs, ports, received)
            )
        ignored = replies.count(None)
        if ignored:
            self.counters.ignored += ignored
        return replies

    def _answer_one(
        self,
        respond: Responder,
        datagram: bytes,
        packed: bytes,
        port: int,
        received: float,
    ) -> bytes | None:
        """The responder's part of :meth:`_decide`, for an admitted datagram."""
        try:
            reply = respond(datagram, received)
        except Exception as exc:  # noqa: BLE001 - one bad datagram must not stop the listener
            self.counters.errors += 1
            self.throttled_error(
                "building a reply failed: {error!r}", exc, packed, port
            )
            return None
        if reply is None:
            self.counters.ignored += 1
        if self.verbose:
            self._log_request(
                datagram, packed, port, "answered" if reply else "ignored"
            )
        return reply

    def _transmit_stamp(self) -> bytes:
        return to_ntp(self._clock.seconds())

    def _refuse(
        self, verdict: Decision, datagram: bytes, packed: bytes, port: int
    ) -> bytes | None:
        counters = self.counters
        reply = None
        if verdict is DROP or verdict is KISS:
            counters.rate_limited += 1
            if verdict is KISS and self._kiss is not None:
                reply = self._kiss(datagram, KISS_RATE)
        elif verdict is DENY or verdict is DENY_KISS:
            counters.denied += 1
            if verdict is DENY_KISS and self._kiss is not None:
                reply = self._kiss(datagram, KISS_DENY)
        else:
            counters.ignored += 1
        if reply is not None:
            counters.kisses += 1
        if self.verbose:
            outcome = ("kissed " if reply else "refused ") + _VERDICT_NAMES.get(
                verdict, "?"
            )
            self._log_request(datagram, packed, port, outcome)
        return reply

    def _log_request(
        self, datagram: bytes, packed: bytes, port: int, outcome: str
    ) -> None:
        self.log.info(
            "{udp_format} request of {size} bytes from {host} port {port} {outcome}",
            udp_format=self.format_name,
            size=len(datagram),
            host=_host_text(packed),
            port=port,
            outcome=outcome,
        )

    def throttled_error(
        self, message: str, exc: BaseException, packed: bytes, port: int
    ) -> None:
        """Log an error that can repeat per datagram, a few times a minute at most."""
        allowed, suppressed = self._error_log.allow()
        if allowed:
            self.log.emit(
                LogLevel.warn,
                message + " (from {host} port {port}; {suppressed} similar suppressed)",
                error=exc,
                host=_host_text(packed),
                port=port,
                suppressed=suppressed,
            )


_VERDICT_NAMES = {
    DROP: "rate-limited",
    KISS: "rate-limited",
    DENY: "denied",
    DENY_KISS: "denied",
    IGNORE: "by the loop guard",
}


def _host_text(packed: bytes) -> str:
    family = socket.AF_INET6 if len(packed) == 16 else socket.AF_INET
    try:
        return socket.inet_ntop(family, packed)
    except (OSError, ValueError):
        return repr(packed)
