"""Who holds the NTS-KE server's connections, and whom a newcomer pushes out.

Pure bookkeeping, no sockets or timers: the shell (:mod:`udptime.nts.ke`)
asks :meth:`SlotTable.admit` before any TLS work, tells each slot when its
connection moves on (first byte, handshake done) and releases it on close.

Caps alone let an attacker starve the server: connections that never send a
byte fill every slot for the whole deadline, and reconnect as soon as they
are closed. So a full table does not turn a newcomer away while some slot is
still waiting for its first byte: the oldest such slot is evicted instead
(then the oldest unfinished handshake). A client that sends its ClientHello
when it connects, as every real one does, leaves the evictable stages within
one round trip and keeps its slot; an attacker's silent connections only
push out each other. Per-address and per-network caps keep one source from
holding much of the table in any stage.
"""

from __future__ import annotations

import enum
from typing import Generic, TypeVar

T = TypeVar("T")

DEFAULT_TOTAL = 100
#: Concurrent connections per source address; a client needs one.
DEFAULT_PER_ADDRESS = 4
#: Concurrent connections per network (IPv6 /64; IPv4 addresses are their own
#: network): one host has a /64 of addresses to dodge a per-address cap with.
DEFAULT_PER_NETWORK = 16

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


class Stage(enum.IntEnum):
    """How far a connection got: the earlier, the sooner it may be evicted."""

    SILENT = 0  #: connected, not a byte received yet
    HANDSHAKE = 1  #: TLS bytes received, handshake not finished
    SESSION = 2  #: handshake done: reading the request, answering


def address_keys(packed: bytes) -> tuple[bytes, bytes]:
    """(address, network) keys of a 4- or 16-byte address.

    An IPv4-mapped IPv6 address counts as its IPv4 address; a native IPv6
    address's network is its /64 (as the rate limiter keys sources).
    """
    if len(packed) == 16:
        if packed[:12] == _MAPPED_PREFIX:
            return packed[12:], packed[12:]
        return packed, packed[:8]
    return packed, packed


class Slot(Generic[T]):
    """One admitted connection; *handle* is whatever the shell closes it with."""

    __slots__ = ("_table", "address", "handle", "network", "stage")

    def __init__(
        self, table: SlotTable[T], address: bytes, network: bytes, handle: T | None
    ) -> None:
        self._table = table
        self.address = address
        self.network = network
        self.handle = handle
        self.stage = Stage.SILENT

    def advance(self, stage: Stage) -> None:
        """Record progress (never backwards; a released slot stays released)."""
        self._table._advance(self, stage)

    def release(self) -> None:
        """The connection is closed; idempotent."""
        self._table._release(self)

    @property
    def held(self) -> bool:
        return self._table._holds(self)


class SlotTable(Generic[T]):
    """At most *total* connections, *per_address* from one address, *per_network*
    from one network; see the module docstring for eviction."""

    def __init__(
        self,
        total: int = DEFAULT_TOTAL,
        per_address: int = DEFAULT_PER_ADDRESS,
        per_network: int = DEFAULT_PER_NETWORK,
    ) -> None:
        if min(total, per_address, per_network) < 1:
            raise ValueError("connection caps must be at least 1")
        self.total = total
        self.per_address = per_address
        self.per_network = per_network
        # Insertion-ordered: the first entry of an evictable stage is its oldest.
        self._by_stage: tuple[dict[Slot[T], None], ...] = ({}, {}, {})
        self._addresses: dict[bytes, int] = {}
        self._networks: dict[bytes, int] = {}

    def __len__(self) -> int:
        return sum(len(slots) for slots in self._by_stage)

    def count(self, stage: Stage) -> int:
        return len(self._by_stage[stage])

    def admit(
        self, packed: bytes, handle: T | None = None
    ) -> tuple[Slot[T] | None, str, Slot[T] | None]:
        """A slot for a connection from *packed*, or why not, and whom it evicts.

        Returns ``(slot, "", evicted)`` (the shell closes *evicted*, already
        released, when not ``None``) or ``(None, reason, None)``.
        """
        address, network = address_keys(packed)
        if self._addresses.get(address, 0) >= self.per_address:
            return None, f"over {self.per_address} connections from one address", None
        if network != address and self._networks.get(network, 0) >= self.per_network:
            return None, f"over {self.per_network} connections from one /64", None
        evicted = None
        if len(self) >= self.total:
            evicted = self._oldest_unfinished()
            if evicted is None:
                return None, f"{self.total} connections busy", None
            evicted.release()
        slot = Slot(self, address, network, handle)
        self._by_stage[Stage.SILENT][slot] = None
        self._addresses[address] = self._addresses.get(address, 0) + 1
        self._networks[network] = self._networks.get(network, 0) + 1
        return slot, "", evicted

    def _oldest_unfinished(self) -> Slot[T] | None:
        for stage in (Stage.SILENT, Stage.HANDSHAKE):
            slots = self._by_stage[stage]
            if slots:
                return next(iter(slots))
        return None

    def _holds(self, slot: Slot[T]) -> bool:
        return slot in self._by_stage[slot.stage]

    def _advance(self, slot: Slot[T], stage: Stage) -> None:
        if stage <= slot.stage or not self._holds(slot):
            return
        del self._by_stage[slot.stage][slot]
        slot.stage = stage
        self._by_stage[stage][slot] = None

    def _release(self, slot: Slot[T]) -> None:
        if not self._holds(slot):
            return
        del self._by_stage[slot.stage][slot]
        for counts, key in (
            (self._addresses, slot.address),
            (self._networks, slot.network),
        ):
            left = counts[key] - 1
            if left:
                counts[key] = left
            else:
                del counts[key]
