"""The answering core: a datagram, its source and receive time in; a reply or a
counted refusal out. Sans-I/O, in the spirit of h11's ``Connection`` and
ntpd-rs's ``Server::handle``: no socket, no reactor, no file, no logging.

The shell (``udptime.protocol`` and the Linux batch port) feeds it and sends
what it returns; it never reads protocol bytes. A format is a pure wire
module plus a :class:`Responder`, registered in ``udptime.registry``.

The common case of a batch (admitted, well-formed) is one call of the
policy (:meth:`Policy.admit_batch`) and one :meth:`Responder.answer_batch`
per batch, each a constant number of Python operations for the common case;
refusals go to the responder's own :meth:`Responder.refuse`, so a kiss is
always in the request's own protocol (NTS kisses carry the Unique
Identifier). What the shell must log (responder errors, ``--verbose``
outcomes) is queued here and read after the send.

A reply is ``bytes``, or a :data:`Sealer`: a zero-argument callable that
returns the complete reply, which the shell calls immediately before the
send that carries it, after the batch's other replies went out. It is for
replies that must carry a time read as late as possible but cannot take the
late stamp because a signature covers it (NTS): the responder does all the
work it can before, the sealer reads the clock and signs, so only the
signing lies between the stamp and the send. Only when a batch is full (a
backlog) does the shell let sealed replies share a send, within a time
budget (``udptime.protocol.SEAL_BUDGET_NS``). It tells a sealer from bytes by type
alone and never looks inside either. In a batch, sealers are listed among
the complete replies.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from udptime.counters import Counters
from udptime.policy import ANSWER, DENY, DENY_KISS, DROP, IGNORE, KISS, Decision, Policy

#: Why a request is refused, as the responder's ``refuse`` is told
#: (NTP sends them as Kiss-o'-Death codes).
RATE = b"RATE"
DENIED = b"DENY"

#: Receive times are integer POSIX nanoseconds, kernel ``timespec`` exact.
NS_PER_SECOND = 1_000_000_000

#: A reply completed by the shell's call right before its send (see above).
Sealer = Callable[[], bytes]
Reply = bytes | Sealer


class Responder(Protocol):
    """A format's answering half: pure, owns every reply it causes.

    ``late_stamp``: replies from :meth:`answer_batch` end in an 8-byte slot
    the shell fills with :meth:`stamp` immediately before the send (NTP's
    transmit timestamp), except those listed as complete.
    ``echoes_anything``: answers any datagram (the text formats), so the
    policy's loop guard protects it. ``kisses``: it has protocol-level
    refusals, so the policy sends a rate-limit refusal once per period.
    """

    late_stamp: bool
    echoes_anything: bool
    kisses: bool

    def answer(self, request: bytes, received_ns: int) -> Reply | None:
        """The complete reply to one request (any stamp in it), or ``None``."""

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[Sequence[Reply | None], Collection[int]]:
        """Replies aligned with *requests*, and the indices of complete ones
        (sealers among them).

        With ``late_stamp``, the other replies have their last 8 bytes
        replaced by :meth:`stamp` right before the send.
        """

    def stamp(self) -> bytes:
        """The 8 bytes of a late stamp, read now (``late_stamp`` formats)."""

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        """The protocol's refusal (:data:`RATE`, :data:`DENIED`), or ``None``."""


@dataclass(frozen=True, slots=True)
class Note:
    """One datagram's outcome, for the shell to log after the send."""

    source: bytes
    port: int
    size: int
    outcome: str


@dataclass(frozen=True, slots=True)
class Failure:
    """A responder raised on a datagram: a bug, logged by the shell (throttled)."""

    error: Exception
    source: bytes
    port: int


_REFUSED = {
    DROP: "refused rate-limited",
    KISS: "refused rate-limited",
    DENY: "refused denied",
    DENY_KISS: "refused denied",
    IGNORE: "refused by the loop guard",
}


class AnsweringCore:
    """Policy in front of one responder, counting every verdict.

    Counts everything except the send itself (``answered``, ``send_errors``),
    which only the shell knows the outcome of.
    """

    __slots__ = (
        "_echoes",
        "_kisses",
        "counters",
        "failures",
        "notes",
        "policy",
        "responder",
        "verbose",
    )

    def __init__(
        self,
        responder: Responder,
        policy: Policy | None,
        counters: Counters | None = None,
        *,
        verbose: bool = False,
    ) -> None:
        self.responder = responder
        self.policy = policy
        self.counters = counters if counters is not None else Counters()
        self.verbose = verbose
        self._echoes = responder.echoes_anything
        self._kisses = responder.kisses
        #: queued for the shell: responder errors, and outcomes when verbose
        self.failures: list[Failure] = []
        self.notes: list[Note] = []

    @property
    def late_stamp(self) -> bool:
        return self.responder.late_stamp

    def answer(
        self, datagram: bytes, source: bytes, port: int, received_ns: int, now: float
    ) -> Reply | None:
        """The complete reply owed to one datagram, or ``None``."""
        self.counters.received += 1
        policy = self.policy
        if policy is not None:
            verdict = policy.admit(source, port, now, self._kisses, self._echoes)
            if verdict is not ANSWER:
                return self._refuse(verdict, datagram, source, port)
        return self._answer_one(datagram, source, port, received_ns)

    def answer_batch(
        self,
        data: Sequence[bytes],
        sources: Sequence[bytes],
        ports: Sequence[int],
        received_ns: Sequence[int],
        now: float,
    ) -> tuple[Sequence[Reply | None], Collection[int]]:
        """:meth:`answer` for a whole batch: replies and the complete indices.

        Complete replies go out as they are; with ``late_stamp`` the others
        get the responder's stamp in their last 8 bytes just before the send.
        """
        n = len(data)
        counters = self.counters
        counters.received += n
        policy = self.policy
        verdicts = (
            None
            if policy is None
            else policy.admit_batch(sources, ports, now, self._kisses, self._echoes)
        )
        if verdicts is None:
            replies, complete = self._respond_batch(data, sources, ports, received_ns)
            if self.verbose:
                self._note_all(data, sources, ports, replies)
            return replies, complete
        # Mixed batch: refusals one by one, the admitted as one smaller batch.
        admitted = [i for i, v in enumerate(verdicts) if v is ANSWER]
        out: list[Reply | None] = [None] * n
        done: set[int] = set()
        for i, v in enumerate(verdicts):
            if v is not ANSWER:
                out[i] = self._refuse(v, data[i], sources[i], ports[i])
                done.add(i)
        if admitted:
            pick = data.__getitem__
            sub, sub_complete = self._respond_batch(
                [pick(i) for i in admitted],
                [sources[i] for i in admitted],
                [ports[i] for i in admitted],
                [received_ns[i] for i in admitted],
            )
            for j, i in enumerate(admitted):
                out[i] = sub[j]
            done.update(admitted[j] for j in sub_complete)
            if self.verbose:
                self._note_all(
                    [data[i] for i in admitted],
                    [sources[i] for i in admitted],
                    [ports[i] for i in admitted],
                    sub,
                )
        return out, done

    def _respond_batch(
        self,
        data: Sequence[bytes],
        sources: Sequence[bytes],
        ports: Sequence[int],
        received_ns: Sequence[int],
    ) -> tuple[Sequence[Reply | None], Collection[int]]:
        try:
            replies, complete = self.responder.answer_batch(data, received_ns)
        except Exception:  # noqa: BLE001 - redone one by one, errors counted there
            singles = [
                self._answer_one(d, s, p, t, note=False)
                for d, s, p, t in zip(data, sources, ports, received_ns)
            ]
            return singles, range(len(singles))
        ignored = replies.count(None)
        if ignored:
            self.counters.ignored += ignored
        return replies, complete

    def _answer_one(
        self,
        datagram: bytes,
        source: bytes,
        port: int,
        received_ns: int,
        *,
        note: bool = True,
    ) -> Reply | None:
        try:
            reply = self.responder.answer(datagram, received_ns)
        except Exception as exc:  # noqa: BLE001 - one bad datagram must not stop us
            self.counters.errors += 1
            self.failures.append(Failure(exc, source, port))
            return None
        if reply is None:
            self.counters.ignored += 1
        if note and self.verbose:
            outcome = "answered" if reply is not None else "ignored"
            self.notes.append(Note(source, port, len(datagram), outcome))
        return reply

    def _refuse(
        self, verdict: Decision, datagram: bytes, source: bytes, port: int
    ) -> bytes | None:
        counters = self.counters
        reply = None
        try:
            if verdict is DROP or verdict is KISS:
                counters.rate_limited += 1
                if verdict is KISS:
                    reply = self.responder.refuse(datagram, RATE)
            elif verdict is DENY or verdict is DENY_KISS:
                counters.denied += 1
                if verdict is DENY_KISS:
                    reply = self.responder.refuse(datagram, DENIED)
            else:
                counters.ignored += 1
        except Exception as exc:  # noqa: BLE001 - as for answers
            counters.errors += 1
            self.failures.append(Failure(exc, source, port))
            return None
        if reply is not None:
            counters.kisses += 1
        if self.verbose:
            outcome = _REFUSED.get(verdict, "refused")
            if reply is not None:
                outcome = "kissed " + outcome.removeprefix("refused ")
            self.notes.append(Note(source, port, len(datagram), outcome))
        return reply

    def _note_all(
        self,
        data: Sequence[bytes],
        sources: Sequence[bytes],
        ports: Sequence[int],
        replies: Sequence[Reply | None],
    ) -> None:
        self.notes.extend(
            Note(s, p, len(d), "answered" if r is not None else "ignored")
            for d, s, p, r in zip(data, sources, ports, replies)
        )
