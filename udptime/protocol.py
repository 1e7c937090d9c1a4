"""The Twisted shell around the answering core: datagrams in, replies out.

Two paths feed the same :class:`udptime.core.AnsweringCore`: the portable
one (``datagramReceived``, one ``sendto`` per reply) and the Linux batch port
(``batch_received``, one ``sendmmsg`` per batch, late stamp written by the
sender at the slot the responder declares). Neither reads protocol bytes.
A reply that is a sealer (``udptime.core.Sealer``) is called right before
its send, after the batch's other replies went out; only in a full batch
do sealed replies share a send, within :data:`SEAL_BUDGET_NS`.
Logging happens after the send: responder errors (throttled) and, with
``--verbose``, one line per datagram.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

from twisted.internet.base import ReactorBase
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger, LogLevel

from udptime.core import AnsweringCore, Reply, Sealer
from udptime.counters import LatencyHistogram
from udptime.logthrottle import LogThrottle
from udptime.mmsg.receive import Receiver
from udptime.mmsg.send import Sender
from udptime.policy import PolicyError, pack_host

#: How long the shell may spend sealing replies (``udptime.core.Sealer``)
#: of a full batch before it sends those sealed so far. A batch that is not
#: full (idle, or loaded below capacity) sends each sealed reply right
#: after its sealing, so its stamp ages by nothing but its own signing. A
#: full batch means a backlog: then sealed replies share sends, each stamp
#: ageing by the sealing of those after it (~3-5 us each) up to this
#: budget, which measured 15-25% more NTS replies per CPU-second than a
#: send each (bench/run.py on loopback; mostly fewer wake-ups of clients).
SEAL_BUDGET_NS = 500_000


def ns_clock(clock: IReactorTime) -> Callable[[], int]:
    """POSIX nanoseconds from *clock*: ``time.time_ns`` for a real reactor."""
    if isinstance(clock, ReactorBase):
        return time.time_ns
    return lambda: round(clock.seconds() * 1e9)


class TimeProtocol(DatagramProtocol):
    """Feeds one listener's datagrams to its core and sends what it returns.

    Errors from the network are data: a responder that raises or a send that
    fails costs that one reply, is counted, and is logged through a throttle
    so a flood cannot fill the disk. The listener never stops for them.
    """

    log = Logger()
    noisy = False

    def __init__(
        self, format_name: str, core: AnsweringCore, clock: IReactorTime
    ) -> None:
        self.format_name = format_name
        self.core = core
        self.counters = core.counters
        self._clock = clock
        self.clock_ns = ns_clock(clock)
        self._stamp = core.responder.stamp if core.late_stamp else None
        #: times the sealing of replies against :data:`SEAL_BUDGET_NS`
        self.seal_clock_ns: Callable[[], int] = time.perf_counter_ns
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
        received_ns = self.clock_ns()
        received = received_ns / 1e9
        reply = self.core.answer(datagram, packed, port, received_ns, received)
        if reply is not None and not isinstance(reply, bytes):
            reply = self._sealed(reply, packed, port)
        if reply is not None:
            transport = self.transport
            assert transport is not None, "datagram before makeConnection"
            try:
                transport.write(reply, addr)
            except OSError as exc:
                # EAGAIN/ENOBUFS on a full send buffer, EMSGSIZE, unreachable
                # networks: this reply is lost, the next datagram is served.
                self.counters.send_errors += 1
                self.throttled_error(
                    "sending a reply failed: {error!r}", exc, packed, port
                )
            else:
                self.counters.answered += 1
                if self.latency is not None:
                    self.latency.observe(self._clock.seconds() - received)
        core = self.core
        if core.failures or core.notes:
            self._log_queued()

    def batch_received(self, receiver: Receiver, sender: Sender, n: int) -> None:
        """The Linux batch port: answer *n* datagrams, all in one ``sendmmsg``."""
        counters = self.counters
        addrs, ports = receiver.sources(n)
        received_ns = receiver.received_ns(n)
        replies, complete = self.core.answer_batch(
            receiver.data(n), addrs, ports, received_ns, self._clock.seconds()
        )
        sealers = _sealers(replies, complete) if complete else None
        if sealers:
            # Sealed and sent after the others (see udptime.core).
            replies = [None if i in sealers else r for i, r in enumerate(replies)]
        count = n - replies.count(None)
        if count:
            dropped = sender.send(
                cast("Sequence[bytes | None]", replies), self._stamp, complete
            )
            counters.answered += count - dropped
            if dropped:
                counters.send_errors += dropped
            latency = self.latency
            if latency is not None:
                sent = self.clock_ns()
                for reply, moment in zip(replies, received_ns, strict=True):
                    if reply is not None:
                        latency.observe((sent - moment) / 1e9)
        if sealers:
            budget = SEAL_BUDGET_NS if n >= receiver.batch else 0
            self._send_sealed(sealers, sender, addrs, ports, budget)
            latency = self.latency
            if latency is not None:
                sent = self.clock_ns()
                for i in sealers:
                    latency.observe((sent - received_ns[i]) / 1e9)
        self._log_queued()

    def _send_sealed(
        self,
        sealers: dict[int, Sealer],
        sender: Sender,
        addrs: Sequence[bytes],
        ports: Sequence[int],
        budget: int,
    ) -> None:
        """Seal replies and send them together until sealing them took
        *budget* ns: no stamp waits longer than that (and one sealing) for
        its send. With no budget, each goes right after its sealing."""
        if not budget:
            for i, sealer in sealers.items():
                sealed = self._sealed(sealer, addrs[i], ports[i])
                if sealed is not None:
                    dropped = sender.send_one(i, sealed)
                    self.counters.answered += 1 - dropped
                    self.counters.send_errors += dropped
            return
        clock = self.seal_clock_ns
        size = max(sealers) + 1
        out: list[bytes | None] = [None] * size
        pending: list[int] = []
        started = 0
        for i, sealer in sealers.items():
            if not pending:
                started = clock()
            sealed = self._sealed(sealer, addrs[i], ports[i])
            if sealed is None:
                continue
            out[i] = sealed
            pending.append(i)
            if clock() - started >= budget:
                self._send_pending(sender, out, pending)
                out = [None] * size
                pending = []
        if pending:
            self._send_pending(sender, out, pending)

    def _send_pending(
        self, sender: Sender, out: list[bytes | None], pending: list[int]
    ) -> None:
        if len(pending) == 1:
            i = pending[0]
            reply = out[i]
            assert reply is not None
            dropped = sender.send_one(i, reply)
        else:
            dropped = sender.send(out)
        self.counters.answered += len(pending) - dropped
        self.counters.send_errors += dropped

    def _sealed(self, sealer: Sealer, packed: bytes, port: int) -> bytes | None:
        """The reply a sealer makes now; a sealer that raises costs its reply."""
        try:
            return sealer()
        except Exception as exc:  # noqa: BLE001 - as for the responder itself
            self.counters.errors += 1
            self.throttled_error(
                "building a reply failed: {error!r}", exc, packed, port
            )
            return None

    def batch_failed(self, error: BaseException) -> None:
        self.counters.errors += 1
        self.throttled_error("a batch failed: {error!r}", error, b"", 0)

    def _log_queued(self) -> None:
        core = self.core
        if core.failures:
            for failure in core.failures:
                self.throttled_error(
                    "building a reply failed: {error!r}",
                    failure.error,
                    failure.source,
                    failure.port,
                )
            core.failures.clear()
        if core.notes:
            for note in core.notes:
                self.log.info(
                    "{udp_format} request of {size} bytes from {host} port {port} "
                    "{outcome}",
                    udp_format=self.format_name,
                    size=note.size,
                    host=_host_text(note.source),
                    port=note.port,
                    outcome=note.outcome,
                )
            core.notes.clear()

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


def _host_text(packed: bytes) -> str:
    family = socket.AF_INET6 if len(packed) == 16 else socket.AF_INET
    try:
        return socket.inet_ntop(family, packed)
    except (OSError, ValueError):
        return repr(packed)


def _sealers(
    replies: Sequence[Reply | None], complete: Collection[int]
) -> dict[int, Sealer]:
    """The sealers among the complete replies, by index."""
    return {
        i: reply
        for i in complete
        if (reply := replies[i]) is not None and not isinstance(reply, bytes)
    }
