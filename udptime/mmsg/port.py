"""The Linux batch port: a ``udp.Port`` that reads and answers in batches.

It is the one owner of its socket: Twisted's port machinery (adoption,
``getHost``, ``stopListening``, closing) with ``doRead`` replaced by
``recvmmsg``/``sendmmsg`` batches. Its protocol must provide
:class:`BatchProtocol`.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import udp
from twisted.python.failure import Failure

from udptime.mmsg.libc import FATAL_SEND
from udptime.mmsg.receive import Receiver
from udptime.mmsg.send import Sender

#: Batches one ``doRead`` handles at most before yielding to the reactor.
DEFAULT_MAX_BATCHES = 16


class BatchProtocol(Protocol):
    """What a :class:`BatchPort` asks of its protocol."""

    def batch_received(self, receiver: Receiver, sender: Sender, n: int) -> None:
        """Answer the *n* datagrams now in *receiver*'s slots, through *sender*."""

    def batch_failed(self, error: BaseException) -> None:
        """A batch raised: it is lost, the port reads on."""


class BatchPort(udp.Port):
    """Serves an adopted, bound UDP socket in batches (see :func:`adopt`)."""

    timestamps = False
    max_batches = DEFAULT_MAX_BATCHES
    clock_ns: Callable[[], int]
    receiver: Receiver
    sender: Sender

    def _connectToProtocol(self) -> None:
        self.receiver = Receiver(
            self.socket, timestamps=self.timestamps, clock_ns=self.clock_ns
        )
        self.sender = Sender(self.receiver)
        super()._connectToProtocol()  # type: ignore[no-untyped-call]

    def doRead(self) -> Failure | None:
        receiver, sender = self.receiver, self.sender
        protocol: BatchProtocol = self.protocol
        full = receiver.batch
        try:
            for _ in range(self.max_batches):
                n = receiver.receive()
                if not n:
                    break
                try:
                    protocol.batch_received(receiver, sender, n)
                except Exception as exc:
                    if isinstance(exc, OSError) and exc.errno in FATAL_SEND:
                        raise
                    protocol.batch_failed(exc)
                if n < full:
                    # The queue ran dry during that call: the reactor (level
                    # triggered) calls again for anything that came since.
                    break
        except OSError as exc:
            return Failure(exc)  # the socket itself is broken: the reactor drops us
        return None


def adopt(
    reactor: Any,
    sock: socket.socket,
    protocol: BatchProtocol,
    *,
    timestamps: bool,
    clock_ns: Callable[[], int],
    max_packet_size: int,
) -> BatchPort:
    """Listen with a :class:`BatchPort` on a duplicate of bound *sock*.

    As ``reactor.adoptDatagramPort``; the caller keeps (and closes) *sock*.
    """
    port: BatchPort = BatchPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
        reactor, sock.fileno(), sock.family, protocol, maxPacketSize=max_packet_size
    )
    port.timestamps = timestamps
    port.clock_ns = clock_ns
    port.startListening()  # type: ignore[no-untyped-call]
    return port
