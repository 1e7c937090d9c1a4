"""The Roughtime responder: one batch of requests in, one signature out.

Every answerable request of a batch becomes a leaf of one Merkle tree whose
root goes into one SREP, signed once by the online key (section 5.3): the
signature, by far the dearest step, is shared by the whole batch. Sans-I/O:
the clock, the kernel's clock state and the delegation are handed in.

What a reply claims (sections 5.2.5 and 9.7):

- MIDP is the time of signing, rounded to the second, taken after every
  request of the batch was received.
- RADI covers the kernel's maximum error plus that rounding, in whole
  seconds, and is never below ``min_radius`` (3 by default: the RFC's floor
  for servers without leap-second information, which this one is).
- An unsynchronised clock (or no clock state at all) is not answered for,
  unless the operator set a ``local_radius``: then that radius is claimed.
- Outside the delegation's MINT..MAXT nobody is answered.
- A reply is never longer than its request.

Roughtime has no error replies: refused requests get nothing.

Speed: requests from one client program share their header (tag count,
offsets, tags, length) and differ in values only, so the positions of VER,
NONC, TYPE and SRV are computed once per header, after a full parse, and
kept in a small table; later requests with that header are checked by
slicing (TYPE, VER and SRV values still checked every time). Replies of one
tree differ in NONC, PATH and INDX only: the rest is built once per tree.

The delegation is read from a :class:`DelegationHolder` at every batch, so
the key service (``udptime.roughtime.service``) can swap in a renewed or
reloaded one without the datagram path noticing.
"""

from __future__ import annotations

import bisect
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import NamedTuple

from udptime.roughtime import wire
from udptime.roughtime.keys import Delegation
from udptime.roughtime.merkle import MerkleTree

#: What the kernel says: (synchronised, maximum error in microseconds), or
#: ``None`` when it cannot be asked.
ClockState = tuple[bool, int] | None

MIN_RADIUS = 3
NS_PER_SECOND = 1_000_000_000
#: Leaves per tree: a PATH of 10 hashes keeps a reply at 736 bytes, well
#: under any request we answer. Larger batches are split.
MAX_TREE_LEAVES = 1024
#: Request headers (and VER values) remembered; the table is emptied when
#: full, so odd requests cost a full parse and nothing more.
LAYOUT_CACHE_SIZE = 64
#: Tag counts beyond this always take the full parse.
_MAX_FAST_TAGS = 16
_TYPE_REQUEST = wire.u32(wire.TYPE_REQUEST)
_TYPE_RESPONSE = wire.u32(wire.TYPE_RESPONSE)
_U32 = struct.Struct("<I")
#: INDX values, 0 .. MAX_TREE_LEAVES - 1, made once.
_INDICES = [_U32.pack(i) for i in range(MAX_TREE_LEAVES)]
#: Upper bounds of the batch-size histogram (requests under one signature).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class _Layout(NamedTuple):
    """Where a request's values lie, for one header and packet size."""

    size: int
    ver: tuple[int, int]
    nonce: tuple[int, int]
    kind: tuple[int, int]
    srv: tuple[int, int] | None


def _layout(packet: bytes) -> _Layout | None:
    """The value positions of a packet that :func:`wire.parse_request`
    accepted (so its header is well formed), or ``None`` if unusual."""
    count = _U32.unpack_from(packet, wire.FRAME_SIZE)[0]
    fields = struct.unpack_from(f"<{2 * count - 1}I", packet, wire.FRAME_SIZE + 4)
    offsets = (0, *fields[: count - 1])
    tags = fields[count - 1 :]
    start = wire.FRAME_SIZE + 8 * count
    ends = (*offsets[1:], len(packet) - start)
    where = {tag: (start + offsets[i], start + ends[i]) for i, tag in enumerate(tags)}
    try:
        return _Layout(
            len(packet), where[wire.VER], where[wire.NONC], where[wire.TYPE],
            where.get(wire.SRV),
        )  # fmt: skip
    except KeyError:
        return None


def _versions_ok(value: bytes) -> bool | None:
    """Whether a VER value offers version 1 (``None``: not a VER value)."""
    try:
        versions = wire.read_u32_list(value, "VER")
    except wire.WireError:
        return None
    if not 1 <= len(versions) <= wire.MAX_VERSIONS:
        return None
    return wire.VERSION_1 in versions


class DelegationHolder:
    """The delegation to sign with now: one attribute, replaced whole.

    Delegations are immutable, so a reader sees either the old one or the
    new one, never a mixture.
    """

    __slots__ = ("delegation",)

    def __init__(self, delegation: Delegation) -> None:
        self.delegation = delegation


@dataclass
class RoughtimeCounters:
    """What the responder did; plain ints for the metrics to read."""

    answered: int = 0
    signatures: int = 0
    batch_count: int = 0
    batch_leaves: int = 0
    too_small: int = 0
    malformed: int = 0
    unsupported_version: int = 0
    wrong_server: int = 0
    unsynchronised: int = 0
    expired: int = 0
    not_yet_valid: int = 0
    oversized: int = 0


class RoughtimeResponder:
    """Answers Roughtime version 1 requests with one delegation."""

    #: Replies are signed whole; nothing is stamped late.
    late_stamp = False
    #: Only well-formed requests are answered, never arbitrary datagrams.
    echoes_anything = False
    #: No refusal is ever sent (section 5.2).
    kisses = False

    def __init__(
        self,
        delegation: Delegation | DelegationHolder,
        clock_state: Callable[[], ClockState],
        *,
        now_ns: Callable[[], int] = time.time_ns,
        min_radius: int = MIN_RADIUS,
        local_radius: int | None = None,
        min_request_size: int = wire.MIN_REQUEST_SIZE,
    ) -> None:
        if min_radius < 1:
            raise ValueError("RADI must not be zero")
        if local_radius is not None and local_radius < 1:
            raise ValueError("the local radius must be at least 1 second")
        if min_request_size < wire.response_size(0):
            raise ValueError("requests that small could not hold a reply")
        if isinstance(delegation, Delegation):
            delegation = DelegationHolder(delegation)
        self.keys = delegation
        self._clock_state = clock_state
        self._now_ns = now_ns
        self.min_radius = min_radius
        self.local_radius = local_radius
        self.min_request_size = min_request_size
        self.counters = RoughtimeCounters()
        #: trees signed, by size: counts per :data:`BATCH_BUCKETS` bound, +Inf last
        self.batch_sizes = [0] * (len(BATCH_BUCKETS) + 1)
        self._layouts: dict[bytes, _Layout] = {}
        self._versions: dict[bytes, bool | None] = {}
        self._templates: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}

    @property
    def delegation(self) -> Delegation:
        """The delegation in force now."""
        return self.keys.delegation

    def answer(self, request: bytes, received_ns: int) -> bytes | None:
        """A batch of one."""
        return self.answer_batch([request], [received_ns])[0][0]

    def answer_batch(
        self, requests: Sequence[bytes], received_ns: Sequence[int]
    ) -> tuple[list[bytes | None], Sequence[int]]:
        """Replies aligned with *requests* (``None``: no reply), and the
        indices of complete replies, which for Roughtime is all of them."""
        replies: list[bytes | None] = [None] * len(requests)
        everyone = range(len(requests))
        valid = self._uniform(requests)
        if valid is None:
            parse = self._parse
            checked = [(i, r) for i, d in enumerate(requests) if (r := parse(d))]
            if not checked:
                return replies, everyone
            indices: Sequence[int] = [i for i, _ in checked]
            nonces: Sequence[bytes] = [nonce for _, (_, nonce) in checked]
            packets: Sequence[bytes] = [requests[i] for i in indices]
        else:
            indices, packets, nonces = everyone, requests, valid
        delegation = self.keys.delegation
        latest = max(received_ns[i] for i in indices)
        now = max(self._now_ns(), latest)
        claim = self._claim(now, len(indices), delegation)
        if claim is None:
            return replies, everyone
        midpoint, radius = claim
        for start in range(0, len(indices), MAX_TREE_LEAVES):
            end = start + MAX_TREE_LEAVES
            self._sign_tree(
                indices[start:end],
                packets[start:end],
                nonces[start:end],
                (midpoint, radius, delegation),
                replies,
            )
        return replies, everyone

    def stamp(self) -> bytes:
        raise NotImplementedError("Roughtime replies are signed whole")

    def refuse(self, request: bytes, why: bytes) -> bytes | None:
        """Nothing: Roughtime has no refusal to send (section 5.2)."""
        return None

    def radius(self, state: ClockState, rounding_us: int = 0) -> int | None:
        """The RADI to claim for a clock in *state* with a MIDP *rounding_us*
        off the true signing time, or ``None`` when the server must not answer.

        The error covered is the kernel's maximum error while synchronised,
        else the operator's ``local_radius`` (if any), plus the rounding.
        """
        if state is not None and state[0]:
            error_us = max(state[1], 0)
        elif self.local_radius is not None:
            error_us = self.local_radius * 1_000_000
        else:
            return None
        radius = max(self.min_radius, -(-(error_us + rounding_us) // 1_000_000))
        return min(radius, 0xFFFFFFFF)

    def _uniform(self, requests: Sequence[bytes]) -> list[bytes] | None:
        """The nonces, when every request has the first one's known header
        and passes the value checks: the common case under load, checked a
        column at a time. ``None``: look at each request on its own."""
        if len(requests) < 2:
            return None
        first = requests[0]
        if first[:8] != wire.MAGIC or len(first) < self.min_request_size:
            return None
        count = int.from_bytes(first[12:16], "little")
        if count > _MAX_FAST_TAGS:
            return None
        end = wire.FRAME_SIZE + 8 * count
        layout = self._layouts.get(first[:end])
        if layout is None or {len(d) for d in requests} != {layout.size}:
            return None
        if {d[:end] for d in requests} != {first[:end]}:
            return None
        a, b = layout.kind
        if {d[a:b] for d in requests} != {_TYPE_REQUEST}:
            return None
        a, b = layout.ver
        versions = self._versions
        if not all(versions.get(v) is True for v in {d[a:b] for d in requests}):
            return None
        if layout.srv is not None:
            a, b = layout.srv
            if {d[a:b] for d in requests} != {self.keys.delegation.srv}:
                return None
        a, b = layout.nonce
        return [d[a:b] for d in requests]

    def _parse(self, datagram: bytes) -> tuple[bytes, bytes] | None:
        """(packet, nonce) of an answerable request; the rest is counted."""
        size = len(datagram)
        if size < self.min_request_size:
            self.counters.too_small += 1
            return None
        if datagram[:8] == wire.MAGIC:
            count = int.from_bytes(datagram[12:16], "little")
            if count <= _MAX_FAST_TAGS:
                layout = self._layouts.get(datagram[: wire.FRAME_SIZE + 8 * count])
                if layout is not None and layout.size == size:
                    return self._check(datagram, layout)
        request = self._parse_fully(datagram)
        if request is None:
            return None
        layout = _layout(datagram)
        if layout is not None:
            if len(self._layouts) >= LAYOUT_CACHE_SIZE:
                self._layouts.clear()
            count = int.from_bytes(datagram[12:16], "little")
            self._layouts[datagram[: wire.FRAME_SIZE + 8 * count]] = layout
            # the full parse found this VER value offering version 1
            if len(self._versions) >= LAYOUT_CACHE_SIZE:
                self._versions.clear()
            self._versions[datagram[layout.ver[0] : layout.ver[1]]] = True
        return request.packet, request.nonce

    def _check(self, datagram: bytes, layout: _Layout) -> tuple[bytes, bytes] | None:
        """The value checks of :func:`wire.parse_request` for a known header."""
        counters = self.counters
        a, b = layout.kind
        if datagram[a:b] != _TYPE_REQUEST:
            counters.malformed += 1
            return None
        a, b = layout.ver
        ver = datagram[a:b]
        versions = self._versions
        try:
            offered = versions[ver]
        except KeyError:
            offered = _versions_ok(ver)
            if len(versions) >= LAYOUT_CACHE_SIZE:
                versions.clear()
            versions[ver] = offered
        if offered is None:
            counters.malformed += 1
            return None
        if not offered:
            counters.unsupported_version += 1
            return None
        if layout.srv is not None:
            a, b = layout.srv
            if datagram[a:b] != self.keys.delegation.srv:
                counters.wrong_server += 1
                return None
        a, b = layout.nonce
        return datagram, datagram[a:b]

    def _parse_fully(self, datagram: bytes) -> wire.Request | None:
        counters = self.counters
        try:
            request = wire.parse_request(datagram, min_size=self.min_request_size)
        except wire.RequestTooSmall:
            counters.too_small += 1
            return None
        except wire.RequestError:
            counters.malformed += 1
            return None
        if wire.VERSION_1 not in request.versions:
            counters.unsupported_version += 1
            return None
        if request.srv is not None and request.srv != self.keys.delegation.srv:
            counters.wrong_server += 1
            return None
        return request

    def _claim(
        self, now_ns: int, count: int, delegation: Delegation
    ) -> tuple[int, int] | None:
        """(MIDP, RADI) for a batch signed at *now_ns*, or ``None`` (counted
        against the *count* requests left unanswered)."""
        counters = self.counters
        midpoint, remainder = divmod(now_ns + NS_PER_SECOND // 2, NS_PER_SECOND)
        rounding_us = -(-abs(remainder - NS_PER_SECOND // 2) // 1000)
        radius = self.radius(self._clock_state(), rounding_us)
        if radius is None:
            counters.unsynchronised += count
            return None
        if midpoint > delegation.maxt:
            counters.expired += count
            return None
        if midpoint < delegation.mint:
            counters.not_yet_valid += count
            return None
        return midpoint, radius

    def _sign_tree(
        self,
        indices: Sequence[int],
        packets: Sequence[bytes],
        nonces: Sequence[bytes],
        claim: tuple[int, int, Delegation],
        replies: list[bytes | None],
    ) -> None:
        """One tree over *packets*, one signature, a reply for each (placed
        at its index in *replies*) unless it would outgrow its request."""
        midpoint, radius, delegation = claim
        counters = self.counters
        n = len(packets)
        tree = MerkleTree(packets)
        srep = wire.encode_srep(
            version=wire.VERSION_1,
            radius=radius,
            midpoint=midpoint,
            versions=wire.SUPPORTED_VERSIONS,
            root=tree.root,
        )
        signature = delegation.sign(srep)
        counters.signatures += 1
        counters.batch_count += 1
        counters.batch_leaves += n
        self.batch_sizes[bisect.bisect_left(BATCH_BUCKETS, n)] += 1
        head, tail = self._template(delegation.cert, len(srep), tree.height)
        built = list(
            map(
                b"".join,
                zip(
                    repeat(head + signature, n),
                    nonces,
                    repeat(_TYPE_RESPONSE, n),
                    tree.paths(),
                    repeat(srep + tail, n),
                    _INDICES[:n],
                ),
            )
        )
        size = len(built[0])  # all replies of a tree are the same size
        if size <= min(map(len, packets)):
            counters.answered += n
            if n == len(replies):
                replies[:] = built
            else:
                for i, reply in zip(indices, built, strict=True):
                    replies[i] = reply
            return
        for i, packet, reply in zip(indices, packets, built, strict=True):
            if size > len(packet):
                counters.oversized += 1
            else:
                replies[i] = reply
                counters.answered += 1

    def _template(
        self, cert: bytes, srep_size: int, height: int
    ) -> tuple[bytes, bytes]:
        """The frame and message header of a reply with that CERT, SREP size
        and PATH length, and what follows SREP (CERT): the constant parts."""
        key = (cert, srep_size * 64 + height)
        found = self._templates.get(key)
        if found is None:
            sample = wire.encode_response(
                signature=bytes(wire.SIGNATURE_SIZE),
                nonce=bytes(wire.NONCE_SIZE),
                path=bytes(wire.HASH_SIZE * height),
                srep=bytes(srep_size),
                cert=cert,
                index=0,
            )
            header = wire.FRAME_SIZE + 8 * 7
            if len(self._templates) >= LAYOUT_CACHE_SIZE:
                self._templates.clear()
            found = self._templates[key] = (sample[:header], cert)
        return found


@dataclass(frozen=True)
class RoughtimeSettings:
    """What the ``roughtime`` format's factory gets from the wiring
    (``udptime.registry.Context.roughtime``).

    *keys* is swapped by the key service; *clock_state* reads the kernel
    (``udptime.clockstate``); *local_radius* is set exactly when the operator
    serves an unsynchronised clock (``--local-stratum``).
    """

    keys: DelegationHolder
    clock_state: Callable[[], ClockState]
    local_radius: int | None = None

    def make_responder(self) -> RoughtimeResponder:
        return RoughtimeResponder(
            self.keys, self.clock_state, local_radius=self.local_radius
        )
