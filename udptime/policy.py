"""Admission policy: may this datagram's source have a reply, and which kind?

Consulted per datagram before any reply is built, at 100k+ datagrams a
second, so it is pure: no I/O, no reactor, and time arrives as the ``now``
argument. Sources are packed address bytes (``socket.inet_pton`` output, as a
caller gets from ``recvfrom`` or :func:`pack_host`) and a port, so the hot path
is dict and set lookups with no ``ipaddress`` objects per datagram.

The checks run in a fixed order, each cheaper and more final than the next:
loop guard, access lists, rate limit. Sources refused by the first two never
touch the rate-limit table, so a flood of denied or loop-guarded datagrams can
neither drain a bucket nor evict a real client's entry.

:meth:`Policy.admit_batch` decides a batch received at one moment as
:meth:`Policy.admit` called per datagram would, decisions and table alike,
with a constant number of Python operations when every source is a full
bucket already in the table (the common case: many sources, none near its
limit); other datagrams go through :meth:`Policy.admit`, one by one.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
import operator
import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """A rate limit, network or policy setting that cannot be enforced."""


class Decision(IntEnum):
    """What the caller does with one datagram.

    An ``IntEnum`` so callers may compare with ``is``/``==`` or index a
    per-decision counter list with it, at int cost.
    """

    #: Build and send the format's normal reply.
    ANSWER = 0
    #: Over the rate limit: send nothing.
    DROP = 1
    #: Over the rate limit, kissable format: send a RATE Kiss-o'-Death.
    KISS = 2
    #: Refused by the access lists: send nothing.
    DENY = 3
    #: Refused by the access lists, kissable format, ``deny_kiss`` on: send a
    #: DENY Kiss-o'-Death (request-sized, so it reflects without amplifying).
    DENY_KISS = 4
    #: Loop guard: port 0, or a well-known echoing service port: send nothing.
    IGNORE = 5


# Module-level aliases: a global load on the hot path instead of a class lookup.
ANSWER = Decision.ANSWER
DROP = Decision.DROP
KISS = Decision.KISS
DENY = Decision.DENY
DENY_KISS = Decision.DENY_KISS
IGNORE = Decision.IGNORE

#: echo, daytime, qotd, chargen, time: services that answer any datagram, so a
#: text reply sent to one of them is answered back, forever.
DEFAULT_LOOP_PORTS = frozenset({7, 13, 17, 19, 37})
DEFAULT_TABLE_SIZE = 65_536

_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_NEVER = -math.inf

#: Tokens a request may be short of and still be answered: float noise in
#: clock stamps (``0.1`` added ten times is ``0.9999999999999999``) must not
#: cost a whole reply. It lets through at most one extra reply, and only when
#: ``burst + rate * elapsed`` is within a millionth below a whole number.
_SLACK = 1e-6
_ENOUGH = 1.0 - _SLACK
_from_bytes = int.from_bytes
_repeat = itertools.repeat
_setitem = operator.setitem
#: The one port no source may use, for formats that do not echo.
_PORT_ZERO = frozenset({0})
_ZERO8 = bytes(8)
_MAPPED_MIDDLE = b"\x00\x00\xff\xff"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A per-source token bucket: *rate* replies a second, *burst* at once."""

    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise PolicyError(f"rate must be a number > 0, not {self.rate!r}")
        if self.burst < 1:
            raise PolicyError(f"burst must be a whole number >= 1, not {self.burst!r}")

    @property
    def period(self) -> float:
        """Seconds to refill an empty bucket: the minimum gap between RATE kisses."""
        return self.burst / self.rate

    def __str__(self) -> str:
        return f"{self.rate:g}/{self.burst}"


DEFAULT_RATE_LIMIT = RateLimit(10.0, 50)


def parse_rate_limit(text: str) -> RateLimit | None:
    """``RATE/BURST`` (replies a second / bucket size), or ``off`` for ``None``."""
    cleaned = text.strip()
    if cleaned.lower() == "off":
        return None
    rate_text, slash, burst_text = cleaned.partition("/")
    if not slash:
        raise PolicyError(
            f"rate limit {text!r}: expected RATE/BURST (e.g. 10/50) or 'off'"
        )
    try:
        rate = float(rate_text)
    except ValueError:
        raise PolicyError(
            f"rate limit {text!r}: rate must be a number of replies a second, "
            f"not {rate_text!r}"
        ) from None
    try:
        burst = int(burst_text, 10)
    except ValueError:
        raise PolicyError(
            f"rate limit {text!r}: burst must be a whole number of replies, "
            f"not {burst_text!r}"
        ) from None
    try:
        return RateLimit(rate, burst)
    except PolicyError as exc:
        raise PolicyError(f"rate limit {text!r}: {exc}") from None


def parse_cidr(text: str) -> Network:
    """``ADDRESS`` or ``ADDRESS/PREFIX``, IPv4 or IPv6.

    Host bits set below the prefix are an error rather than silently masked:
    ``10.0.0.1/8`` is far more often a mistyped ``/32`` than a wish for all of
    10/8. An IPv6 network inside ``::ffff:0:0/96`` becomes the IPv4 network it
    maps, because :meth:`Policy.admit` sees mapped sources as IPv4.
    """
    cleaned = text.strip()
    if "%" in cleaned:
        raise PolicyError(
            f"{text!r}: drop the %zone, access lists match addresses only"
        )
    try:
        network = ipaddress.ip_network(cleaned, strict=False)
    except ValueError as exc:
        raise PolicyError(
            f"{text!r} is not an IPv4 or IPv6 network (ADDRESS or ADDRESS/PREFIX): "
            f"{exc}"
        ) from None
    if network.network_address != ipaddress.ip_interface(cleaned).ip:
        raise PolicyError(
            f"{text!r} has host bits set after the prefix; did you mean {network}?"
        )
    return _unmapped(network)


def _unmapped(network: Network) -> Network:
    """An IPv6 network within ``::ffff:0:0/96`` as the IPv4 network it maps."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def pack_host(host: str) -> bytes:
    """Packed address bytes for a text host, as :meth:`Policy.admit` takes them.

    For callers that only have Twisted's text address; ``inet_pton`` is a
    single C call, far cheaper than an ``ipaddress`` object. A ``%scope``
    suffix (link-local IPv6) is dropped: the bucket key does not need it.
    """
    try:
        if ":" in host:
            if "%" in host:
                host = host.partition("%")[0]
            return socket.inet_pton(socket.AF_INET6, host)
        return socket.inet_pton(socket.AF_INET, host)
    except OSError:
        raise PolicyError(f"{host!r} is not an IPv4 or IPv6 address") from None


def source_key(packed: bytes) -> bytes:
    """The rate-limit key: IPv4 /32, IPv6 /64, IPv4-mapped IPv6 as its IPv4.

    A /64 is what one IPv6 host or LAN is handed; keying on full addresses
    would let one host take 2**64 buckets. Keys of 4 and 8 bytes never collide.
    """
    if len(packed) == 16:
        if packed[:12] == _MAPPED_PREFIX:
            return packed[12:]
        return packed[:8]
    return packed


class _Bucket:
    """One source's token bucket plus its over-limit bookkeeping.

    Four slots and no ``__dict__``. Most sources never need one: a bucket
    that is full but for the request just answered (``burst - 1`` tokens),
    never over its limit and never kissed, is kept in the table as a
    one-element list of its stamp instead (see :class:`Policy`).
    """

    __slots__ = ("kissed", "over", "stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        #: Over-limit requests seen, modulo the leak interval.
        self.over = 0
        #: When this source was last sent a RATE kiss.
        self.kissed = _NEVER


_Levels = tuple[tuple[int, frozenset[int]], ...]


def _levels(networks: Iterable[Network], bits: int) -> _Levels:
    """Per configured prefix length, the set of network numbers shifted down.

    A lookup is then one shift and one set probe per prefix length actually
    in use, whatever the number of networks.
    """
    by_length: dict[int, set[int]] = {}
    for network in networks:
        shift = bits - network.prefixlen
        by_length.setdefault(shift, set()).add(int(network.network_address) >> shift)
    # Longest shift (widest networks) first: one broad rule ends most lookups.
    return tuple(
        (shift, frozenset(nets))
        for shift, nets in sorted(by_length.items(), reverse=True)
    )


def _as_networks(entries: Iterable[str | Network]) -> list[Network]:
    return [parse_cidr(e) if isinstance(e, str) else _unmapped(e) for e in entries]


class Policy:
    """Admission for every listener that shares it; one table of sources.

    Share one ``Policy`` between a server's listeners: a source's budget is
    then per server, so opening more ports does not multiply what one source
    can make the server reflect. The format's flags are per call because they
    differ between those listeners; they cost a bool test each.

    Memory: the rate-limit table holds at most *table_size* sources and
    evicts the least recently seen. Each entry costs at most about 300 bytes
    on CPython 3.11: key bytes 48, ``OrderedDict`` slot and link node ~100,
    the four-slot bucket 64, its two floats 64. ``tests/test_policy.py``
    measures 293 bytes, so 18.3 MiB for the default 65,536 entries (peak
    23.3 MiB while the dict first grows), however many sources pass through.
    Most entries are smaller: a source whose bucket is full but for its last
    request, and that was never over its limit, is stored as ``[stamp]``, a
    one-element list (``tokens`` is then ``burst - 1``, ``over`` 0, never
    kissed). Lists compare by their items, so :meth:`admit_batch` finds out
    whether a batch of such sources are all full with one ``max`` in C, and
    restamps them with one ``map``.
    An evicted source that returns starts with a full bucket, so the table
    must be larger than the number of sources expected to be limited at once;
    least-recently-used order keeps a flooding source, always the most
    recent, in the table.
    """

    __slots__ = (
        "_acl",
        "_allow4",
        "_allow6",
        "_burst",
        "_deny4",
        "_deny6",
        "_deny_kiss",
        "_echo_guard",
        "_first",
        "_inverse_rate",
        "_leak",
        "_open",
        "_period",
        "_rate",
        "_rate_limit",
        "_recheck6",
        "_table",
        "_table_size",
    )

    def __init__(
        self,
        rate_limit: RateLimit | None = DEFAULT_RATE_LIMIT,
        table_size: int = DEFAULT_TABLE_SIZE,
        leak: int = 0,
        allow: Iterable[str | Network] = (),
        deny: Iterable[str | Network] = (),
        deny_kiss: bool = False,
        loop_ports: Iterable[int] = DEFAULT_LOOP_PORTS,
    ) -> None:
        if table_size < 1:
            raise PolicyError(f"table size must be at least 1, not {table_size}")
        if leak < 0:
            raise PolicyError(f"leak must be 0 (off) or a positive count, not {leak}")
        self._rate_limit = rate_limit
        self._rate = rate_limit.rate if rate_limit is not None else 0.0
        self._burst = float(rate_limit.burst) if rate_limit is not None else 0.0
        # One shared float for every new bucket: a flood of one-off spoofed
        # sources then costs no float object per entry for its tokens.
        self._first = self._burst - 1.0
        self._period = rate_limit.period if rate_limit is not None else 0.0
        self._inverse_rate = 1.0 / self._rate if self._rate else 0.0
        #: A source's state: a bucket, or ``[stamp]`` for a source with
        #: ``burst - 1`` tokens, ``over`` 0 and no kiss sent (most sources).
        self._table: OrderedDict[bytes, _Bucket | list[float]] = OrderedDict()
        self._table_size = table_size
        self._leak = leak
        self._deny_kiss = deny_kiss
        # Port 0 is never a real client: replying to it only feeds a loop.
        self._echo_guard = frozenset(loop_ports) | {0}

        self._set_lists(allow, deny)
        self._open = rate_limit is None and not self._acl

    def replace_lists(
        self, allow: Iterable[str | Network], deny: Iterable[str | Network]
    ) -> None:
        """New access lists (a reload): sources now refused leave the table.

        Table entries skip the lists on a hit, so each kept entry is checked
        against the new lists once, here; the rate-limit state of sources
        still admitted is kept.
        """
        self._set_lists(allow, deny)
        self._open = self._rate_limit is None and not self._acl
        if self._acl:
            for key in list(self._table):
                if self._refused(key if len(key) == 4 else key + bytes(8)):
                    del self._table[key]

    def _set_lists(
        self, allow: Iterable[str | Network], deny: Iterable[str | Network]
    ) -> None:
        allowed = _as_networks(allow)
        denied = _as_networks(deny)
        self._acl = bool(allowed or denied)
        self._deny4 = _levels((n for n in denied if n.version == 4), 32)
        self._deny6 = _levels((n for n in denied if n.version == 6), 128)
        # ``None`` means "no allow list": everyone not denied is served. Once
        # any allow is given, a family without allows is served to nobody.
        self._allow4: _Levels | None = None
        self._allow6: _Levels | None = None
        if allowed:
            self._allow4 = _levels((n for n in allowed if n.version == 4), 32)
            self._allow6 = _levels((n for n in allowed if n.version == 6), 128)
        # Rules finer than the /64 key can split one bucket's addresses
        # between verdicts, so a table hit cannot stand in for the lists.
        self._recheck6 = any(
            n.version == 6 and n.prefixlen > 64 for n in (*allowed, *denied)
        )

    @property
    def rate_limit(self) -> RateLimit | None:
        return self._rate_limit

    @property
    def table_size(self) -> int:
        """The most sources the rate-limit table tracks at once."""
        return self._table_size

    @property
    def leak(self) -> int:
        return self._leak

    def __len__(self) -> int:
        """Sources tracked now; never more than :attr:`table_size`."""
        return len(self._table)

    def __contains__(self, packed: object) -> bool:
        """Whether the source's bucket (its /32 or /64) is in the table."""
        return isinstance(packed, bytes) and source_key(packed) in self._table

    def _refused(self, packed: bytes) -> bool:
        """Access lists for a 4- or 16-byte address: deny wins, then allow."""
        number = _from_bytes(packed)
        if len(packed) == 16:
            deny, allow = self._deny6, self._allow6
        else:
            deny, allow = self._deny4, self._allow4
        for shift, networks in deny:
            if number >> shift in networks:
                return True
        if allow is None:
            return False
        for shift, networks in allow:
            if number >> shift in networks:
                return False
        return True

    def admit(
        self,
        packed: bytes,
        port: int,
        now: float,
        can_kiss: bool,
        echoes_anything: bool,
    ) -> Decision:
        """Decide for one datagram from *packed*:*port* received at *now*.

        *packed* is 4 or 16 bytes; *now* is seconds on any clock that the
        caller uses for every call (a step backwards costs nobody tokens).
        *can_kiss* says the format has Kiss-o'-Death replies (NTP);
        *echoes_anything* says it answers any datagram (the text formats).
        """
        # Loop guard: before anything else, and with no state touched.
        if echoes_anything:
            if port in self._echo_guard:
                return IGNORE
        elif not port:
            return IGNORE
        if self._open:
            return ANSWER

        recheck = False
        if len(packed) == 16:
            # Byte 11 first: one index rejects nearly every native IPv6 source
            # before the slice and compare.
            if packed[11] == 0xFF and packed[:12] == _MAPPED_PREFIX:
                packed = packed[12:]
                key = packed
            else:
                key = packed[:8]
                recheck = self._recheck6
        else:
            key = packed

        # A source in the table passed the access lists when it was added
        # (a reload drops the entries it refuses), so a hit skips them unless
        # a rule is finer than the key (an IPv6 prefix longer than /64).
        table = self._table
        bucket = table.get(key)
        if bucket is None or recheck:
            if self._acl and self._refused(packed):
                return DENY_KISS if can_kiss and self._deny_kiss else DENY
            if bucket is None:
                if not self._rate:
                    return ANSWER
                if len(table) >= self._table_size:
                    table.popitem(False)
                # A new bucket: burst - 1 tokens once this one is answered
                # (a NaN clock, never a real one, gets no compact stamp).
                compact = now == now  # noqa: PLR0124 - False for NaN alone
                table[key] = [now] if compact else _Bucket(self._first, now)
                return ANSWER
        table.move_to_end(key)

        if isinstance(bucket, list):
            # The compact form: burst - 1 tokens, stamped bucket[0].
            tokens = self._first
            elapsed = now - bucket[0]
            if elapsed > 0.0:
                tokens += elapsed * self._rate
                if tokens > self._burst:  # noqa: PLR1730 - min() is a call
                    tokens = self._burst
            if tokens >= _ENOUGH:
                tokens -= 1.0
                if tokens == self._first:
                    bucket[0] = now
                else:
                    table[key] = _Bucket(tokens, now)
                return ANSWER
            # Over the limit (a burst of 1): a bucket from here on.
            full = table[key] = _Bucket(tokens, now)
            return self._over(full, now, can_kiss)

        tokens = bucket.tokens
        elapsed = now - bucket.stamp
        if elapsed > 0.0:
            tokens += elapsed * self._rate
            if tokens > self._burst:  # noqa: PLR1730 - min() is a call, twice the cost
                tokens = self._burst
        # A clock stepped backwards restarts the refill from here instead of
        # charging the source for time that never passed.
        if tokens >= _ENOUGH:
            tokens -= 1.0
            if tokens == self._first and not bucket.over and bucket.kissed is _NEVER:
                table[key] = [now]  # back to the compact form
                return ANSWER
            bucket.tokens = tokens
            bucket.stamp = now
            return ANSWER
        bucket.tokens = tokens
        bucket.stamp = now
        return self._over(bucket, now, can_kiss)

    def _over(self, bucket: _Bucket, now: float, can_kiss: bool) -> Decision:
        """Over the limit: the leak, then at most one kiss per bucket period."""
        leak = self._leak
        if leak:
            over = bucket.over + 1
            if over >= leak:
                bucket.over = 0
                return ANSWER
            bucket.over = over
        if can_kiss:
            since = now - bucket.kissed
            if since >= self._period or since < 0.0:
                bucket.kissed = now
                return KISS
        return DROP

    def admit_batch(
        self,
        packed: Sequence[bytes],
        ports: Sequence[int],
        now: float,
        can_kiss: bool,
        echoes_anything: bool,
    ) -> list[Decision] | None:
        """:meth:`admit` for datagrams received together at *now*, in order.

        ``None`` when every one is answered, else the decisions, aligned.
        Decisions and the table afterwards (buckets, order, evictions) are
        exactly those of :meth:`admit` called for each datagram in turn. A
        batch of distinct sources that all hold full compact buckets is
        decided in C (a few passes of ``map``, ``max`` and friends); every
        other datagram goes through :meth:`admit` alone, and when that could
        change which entries a new source evicts, the whole batch does.
        """
        n = len(packed)
        if not n:
            return None
        guard = self._echo_guard if echoes_anything else _PORT_ZERO
        if self._open or not self._rate or not guard.isdisjoint(ports):
            if self._open and guard.isdisjoint(ports):
                return None
            return self._admit_each(packed, ports, now, can_kiss, echoes_anything)
        keys = self._keys(packed, n)
        # Distinct sources: a second datagram from one would see the first's
        # refill, which only admit's order of work gets right.
        if keys is None or len(set(keys)) != n:
            return self._admit_each(packed, ports, now, can_kiss, echoes_anything)
        table = self._table
        values: list[Any] = list(map(table.get, keys))
        full = self._full_until(now)
        try:
            # Lists compare by their stamps; a bucket or a new source raises.
            everyone = max(values) <= [full]
        except TypeError:
            everyone = False
        if everyone:
            any(map(_setitem, values, _repeat(0), _repeat(now)))
            any(map(table.move_to_end, keys))
            return None
        # True for a compact stamp at or before *full*, False for a later
        # one, NotImplemented for a bucket or a new source.
        flags = list(map([full].__ge__, values))
        others = list(
            itertools.compress(range(n), map(operator.is_not, flags, _repeat(True)))
        )
        new = values.count(None)
        # A new source evicts the least recently seen entry; only if none
        # of those is in this batch is the order of the work free.
        if (
            new
            and len(table) + new > self._table_size
            and not set(keys).isdisjoint(itertools.islice(table, new))
        ):
            return self._admit_each(packed, ports, now, can_kiss, echoes_anything)
        stamped = itertools.compress(values, map(operator.is_, flags, _repeat(True)))
        any(map(_setitem, stamped, _repeat(0), _repeat(now)))
        decisions = [ANSWER] * n
        admit = self.admit
        for i in others:
            decisions[i] = admit(packed[i], ports[i], now, can_kiss, echoes_anything)
        # Each source touched ends up most recent, in batch order, as with
        # admit one by one (sources never in the table are not moved).
        any(map(table.move_to_end, filter(table.__contains__, keys)))
        return None if decisions.count(ANSWER) == n else decisions

    def _admit_each(
        self,
        packed: Sequence[bytes],
        ports: Sequence[int],
        now: float,
        can_kiss: bool,
        echoes_anything: bool,
    ) -> list[Decision] | None:
        admit = self.admit
        decisions = [
            admit(a, p, now, can_kiss, echoes_anything) for a, p in zip(packed, ports)
        ]
        return None if decisions.count(ANSWER) == len(decisions) else decisions

    def _keys(self, packed: Sequence[bytes], n: int) -> Sequence[bytes] | None:
        """Every datagram's table key, made in C, or ``None`` for a mixed batch.

        One family per batch (one socket); on an IPv6 socket, IPv4-mapped
        sources all or none; no IPv6 rule finer than the /64 key.
        """
        width = len(packed[0])
        blob = b"".join(packed)
        if len(blob) != width * n:
            return None
        if width == 4:
            return packed
        if width != 16:
            return None
        parts = _split16(n).unpack(blob)
        middles = parts[1::3]
        mapped = middles.count(_MAPPED_MIDDLE)
        if mapped == n:
            heads = parts[0::3]
            return parts[2::3] if heads.count(_ZERO8) == n else None
        if mapped or self._recheck6:
            return None
        return parts[0::3]

    def _full_until(self, now: float) -> float:
        """A stamp *s* such that a compact bucket stamped at or before *s* is
        full at *now* (answered, compact again); NaN when none is sure to be.

        Checked with the very arithmetic of :meth:`admit` (a down-set: the
        refill only grows as the stamp goes back), so sources stamped
        between the result and the exact edge merely take :meth:`admit`.
        """
        first, rate, burst = self._first, self._rate, self._burst
        candidate = now - self._inverse_rate
        for _ in range(3):
            elapsed = now - candidate
            if elapsed > 0.0:
                tokens = first + elapsed * rate
                if tokens > burst:  # noqa: PLR1730 - as in admit
                    tokens = burst
                if tokens >= _ENOUGH and tokens - 1.0 == first:
                    return candidate
            candidate -= (abs(candidate) + self._inverse_rate) * 2.0**-40
        return math.nan


@functools.cache
def _split16(n: int) -> struct.Struct:
    """*n* 16-byte addresses as (first 8, next 4, last 4 bytes) each."""
    return struct.Struct("8s4s4s" * n)
