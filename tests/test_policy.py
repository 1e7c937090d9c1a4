"""The admission policy: loop guard, access lists, per-source token buckets."""

from __future__ import annotations

import ipaddress
import tracemalloc
from collections import OrderedDict
from fractions import Fraction
from itertools import pairwise
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from udptime.policy import (
    ANSWER,
    DEFAULT_LOOP_PORTS,
    DEFAULT_RATE_LIMIT,
    DEFAULT_TABLE_SIZE,
    DENY,
    DENY_KISS,
    DROP,
    IGNORE,
    KISS,
    Decision,
    Network,
    Policy,
    PolicyError,
    RateLimit,
    pack_host,
    parse_cidr,
    parse_rate_limit,
    source_key,
)

CLIENT_PORT = 40_000


def text(policy: Policy, host: str, now: float, port: int = CLIENT_PORT) -> Decision:
    """A datagram to a text format: echoes anything, cannot kiss."""
    return policy.admit(pack_host(host), port, now, False, True)


def ntp(policy: Policy, host: str, now: float, port: int = CLIENT_PORT) -> Decision:
    """A datagram to NTP: can kiss, answers only what parses as NTP."""
    return policy.admit(pack_host(host), port, now, True, False)


def answers(policy: Policy, host: str, now: float, count: int) -> int:
    return sum(text(policy, host, now) is ANSWER for _ in range(count))


class RateLimitParseTests(unittest.TestCase):
    def test_rate_and_burst(self) -> None:
        self.assertEqual(parse_rate_limit("10/50"), RateLimit(10.0, 50))
        self.assertEqual(parse_rate_limit(" 0.5/1 "), RateLimit(0.5, 1))
        self.assertEqual(parse_rate_limit("1e3/2"), RateLimit(1000.0, 2))

    def test_off(self) -> None:
        self.assertIsNone(parse_rate_limit("off"))
        self.assertIsNone(parse_rate_limit(" OFF "))

    def test_default_is_10_per_second_burst_50(self) -> None:
        self.assertEqual(DEFAULT_RATE_LIMIT, RateLimit(10.0, 50))
        self.assertEqual(Policy().rate_limit, DEFAULT_RATE_LIMIT)

    def test_str_round_trips(self) -> None:
        for text_ in ("10/50", "0.5/1", "1000/2"):
            self.assertEqual(str(parse_rate_limit(text_)), text_)

    def test_period_is_burst_over_rate(self) -> None:
        self.assertEqual(RateLimit(10, 50).period, 5.0)

    def test_errors(self) -> None:
        cases = {
            "10": "expected RATE/BURST",
            "": "expected RATE/BURST",
            "on": "expected RATE/BURST",
            "ten/50": "rate must be a number",
            "0/50": "rate must be a number > 0",
            "-1/50": "rate must be a number > 0",
            "nan/50": "rate must be a number > 0",
            "inf/50": "rate must be a number > 0",
            "10/0": "burst must be a whole number >= 1",
            "10/-3": "burst must be a whole number >= 1",
            "10/1.5": "burst must be a whole number",
            "10/": "burst must be a whole number",
            "10/50/2": "burst must be a whole number",
        }
        for bad, message in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_rate_limit(bad)
            self.assertIn(message, str(caught.exception), bad)
            self.assertIn(repr(bad), str(caught.exception), bad)

    def test_rate_limit_validates_itself(self) -> None:
        self.assertRaises(PolicyError, RateLimit, 0.0, 5)
        self.assertRaises(PolicyError, RateLimit, 5.0, 0)


class CidrTests(unittest.TestCase):
    def test_networks_and_bare_addresses(self) -> None:
        self.assertEqual(parse_cidr("10.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parse_cidr("192.0.2.7"), ipaddress.ip_network("192.0.2.7/32"))
        self.assertEqual(
            parse_cidr("2001:db8::/32"), ipaddress.ip_network("2001:db8::/32")
        )
        self.assertEqual(
            parse_cidr("2001:db8::1"), ipaddress.ip_network("2001:db8::1/128")
        )

    def test_host_bits_suggest_the_network(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_cidr("10.1.2.3/8")
        self.assertIn("did you mean 10.0.0.0/8?", str(caught.exception))

    def test_mapped_network_becomes_ipv4(self) -> None:
        self.assertEqual(
            parse_cidr("::ffff:10.0.0.0/104"), ipaddress.ip_network("10.0.0.0/8")
        )
        self.assertEqual(parse_cidr("::ffff:0:0/96"), ipaddress.ip_network("0.0.0.0/0"))

    def test_errors(self) -> None:
        for bad in ("", "ten", "10.0.0.0/33", "2001:db8::/129", "fe80::1%eth0"):
            with self.assertRaises(ValueError) as caught:
                parse_cidr(bad)
            self.assertIn(repr(bad), str(caught.exception))


class AddressTests(unittest.TestCase):
    def test_pack_host(self) -> None:
        self.assertEqual(pack_host("192.0.2.1"), bytes([192, 0, 2, 1]))
        self.assertEqual(len(pack_host("2001:db8::1")), 16)
        self.assertEqual(pack_host("fe80::1%eth0"), pack_host("fe80::1"))

    def test_pack_host_rejects_names(self) -> None:
        self.assertRaises(ValueError, pack_host, "localhost")
        self.assertRaises(ValueError, pack_host, "2001:db8::g")

    def test_keys(self) -> None:
        self.assertEqual(source_key(pack_host("192.0.2.1")), bytes([192, 0, 2, 1]))
        self.assertEqual(
            source_key(pack_host("2001:db8:1:2:3:4:5:6")),
            pack_host("2001:db8:1:2::")[:8],
        )
        self.assertEqual(
            source_key(pack_host("::ffff:192.0.2.1")), bytes([192, 0, 2, 1])
        )


class TokenBucketTests(unittest.TestCase):
    def test_burst_exactly(self) -> None:
        policy = Policy(RateLimit(10, 50))
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 1000), 50)

    def test_burst_exactly_at_epoch_scale_times(self) -> None:
        policy = Policy(RateLimit(10, 50))
        self.assertEqual(answers(policy, "192.0.2.1", 1.7e9, 1000), 50)
        self.assertEqual(answers(policy, "192.0.2.1", 1.7e9 + 3.0, 1000), 30)

    def test_refill_rate_times_t(self) -> None:
        policy = Policy(RateLimit(10, 50))
        clock = Clock()
        self.assertEqual(answers(policy, "192.0.2.1", clock.seconds(), 1000), 50)
        for seconds in (1.0, 2.5, 0.1, 4.0):
            clock.advance(seconds)
            self.assertEqual(
                answers(policy, "192.0.2.1", clock.seconds(), 1000),
                round(10 * seconds),
            )

    def test_refill_in_small_steps_loses_nothing_to_float_noise(self) -> None:
        policy = Policy(RateLimit(10, 50))
        clock = Clock()
        answers(policy, "192.0.2.1", clock.seconds(), 1000)
        total = 0
        for _ in range(100):
            clock.advance(0.01)
            total += answers(policy, "192.0.2.1", clock.seconds(), 1000)
        self.assertEqual(total, 10)

    def test_refill_stops_at_burst(self) -> None:
        policy = Policy(RateLimit(10, 50))
        answers(policy, "192.0.2.1", 0.0, 1000)
        self.assertEqual(answers(policy, "192.0.2.1", 3600.0, 1000), 50)

    def test_fractional_rate(self) -> None:
        policy = Policy(RateLimit(0.5, 1))
        got = [text(policy, "192.0.2.1", t * 0.5) is ANSWER for t in range(9)]
        self.assertEqual(
            got, [True, False, False, False, True, False, False, False, True]
        )

    def test_sources_have_their_own_buckets(self) -> None:
        policy = Policy(RateLimit(1, 3))
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 10), 3)
        self.assertEqual(answers(policy, "192.0.2.2", 0.0, 10), 3)
        self.assertEqual(answers(policy, "2001:db8::1", 0.0, 10), 3)

    def test_over_limit_is_drop(self) -> None:
        policy = Policy(RateLimit(1, 1))
        self.assertIs(text(policy, "192.0.2.1", 0.0), ANSWER)
        self.assertIs(text(policy, "192.0.2.1", 0.0), DROP)
        self.assertIs(ntp(policy, "192.0.2.1", 0.0), KISS)
        self.assertIs(ntp(policy, "192.0.2.1", 0.0), DROP)

    def test_clock_stepping_back_costs_no_tokens(self) -> None:
        policy = Policy(RateLimit(10, 50))
        self.assertEqual(answers(policy, "192.0.2.1", 10_000.0, 20), 20)
        self.assertEqual(answers(policy, "192.0.2.1", 6_400.0, 1000), 30)
        # Refill resumes from the new reading, not from the old one.
        self.assertEqual(answers(policy, "192.0.2.1", 6_401.0, 1000), 10)

    def test_off_answers_everything_and_tracks_nothing(self) -> None:
        policy = Policy(None)
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 1000), 1000)
        self.assertEqual(len(policy), 0)


class LeakTests(unittest.TestCase):
    def test_every_nth_over_limit_request_is_answered(self) -> None:
        policy = Policy(RateLimit(1, 2), leak=3)
        got = [text(policy, "192.0.2.1", 0.0) for _ in range(11)]
        self.assertEqual(
            got,
            [
                ANSWER,
                ANSWER,
                DROP,
                DROP,
                ANSWER,
                DROP,
                DROP,
                ANSWER,
                DROP,
                DROP,
                ANSWER,
            ],
        )

    def test_leak_one_answers_everything(self) -> None:
        policy = Policy(RateLimit(1, 2), leak=1)
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 100), 100)

    def test_leak_counts_per_source_and_takes_precedence_over_a_kiss(self) -> None:
        policy = Policy(RateLimit(1, 1), leak=2)
        self.assertEqual(
            [ntp(policy, "192.0.2.1", 0.0) for _ in range(6)],
            [ANSWER, KISS, ANSWER, DROP, ANSWER, DROP],
        )
        self.assertEqual(
            [text(policy, "192.0.2.2", 0.0) for _ in range(4)],
            [ANSWER, DROP, ANSWER, DROP],
        )

    def test_negative_leak_is_refused(self) -> None:
        self.assertRaises(ValueError, Policy, leak=-1)


class KissTests(unittest.TestCase):
    def test_at_most_one_kiss_per_bucket_period(self) -> None:
        # 100 requests a second for 20 s against 10/s burst 50: period 5 s.
        policy = Policy(RateLimit(10, 50))
        kisses = []
        for tick in range(2000):
            now = tick / 100
            if ntp(policy, "192.0.2.1", now) is KISS:
                kisses.append(now)
        self.assertEqual(len(kisses), 4)
        for earlier, later in pairwise(kisses):
            self.assertGreaterEqual(later - earlier, 5.0)

    def test_no_kiss_for_formats_that_cannot(self) -> None:
        policy = Policy(RateLimit(1, 1))
        self.assertNotIn(KISS, [text(policy, "192.0.2.1", 0.0) for _ in range(10)])

    def test_kiss_again_after_the_clock_steps_back(self) -> None:
        policy = Policy(RateLimit(1, 1))
        self.assertEqual(ntp(policy, "192.0.2.1", 100.0), ANSWER)
        self.assertEqual(ntp(policy, "192.0.2.1", 100.0), KISS)
        self.assertEqual(ntp(policy, "192.0.2.1", 100.5), DROP)
        self.assertEqual(ntp(policy, "192.0.2.1", 50.0), KISS)


class TableTests(unittest.TestCase):
    def test_least_recently_used_is_evicted(self) -> None:
        policy = Policy(RateLimit(1, 5), table_size=3)
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            text(policy, host, 0.0)
        text(policy, "192.0.2.1", 0.0)  # now the most recent
        text(policy, "192.0.2.4", 0.0)
        self.assertNotIn(pack_host("192.0.2.2"), policy)
        for host in ("192.0.2.1", "192.0.2.3", "192.0.2.4"):
            self.assertIn(pack_host(host), policy)
        text(policy, "192.0.2.5", 0.0)
        self.assertNotIn(pack_host("192.0.2.3"), policy)

    def test_a_limited_source_touching_its_entry_keeps_it(self) -> None:
        policy = Policy(RateLimit(1, 1), table_size=2)
        text(policy, "192.0.2.1", 0.0)
        for n in range(100):
            self.assertIs(text(policy, "192.0.2.1", 0.0), DROP)
            text(policy, f"198.51.100.{n}", 0.0)
        self.assertIs(text(policy, "192.0.2.1", 0.0), DROP)

    def test_an_evicted_source_returns_with_a_full_bucket(self) -> None:
        policy = Policy(RateLimit(1, 5), table_size=1)
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 10), 5)
        text(policy, "192.0.2.2", 0.0)
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 10), 5)

    def test_never_exceeds_its_size(self) -> None:
        policy = Policy(RateLimit(1, 5), table_size=100)
        for n in range(1000):
            policy.admit(n.to_bytes(4, "big"), CLIENT_PORT, 0.0, False, True)
            self.assertLessEqual(len(policy), 100)
        self.assertEqual(len(policy), 100)
        self.assertEqual(policy.table_size, 100)

    def test_default_size(self) -> None:
        self.assertEqual(Policy().table_size, DEFAULT_TABLE_SIZE)
        self.assertEqual(DEFAULT_TABLE_SIZE, 65_536)

    def test_size_must_be_positive(self) -> None:
        self.assertRaises(ValueError, Policy, table_size=0)

    def test_memory_bound(self) -> None:
        """300,000 distinct sources, each seen twice, through 65,536 entries.

        Twice, at distinct times, so every entry holds its own two floats:
        the worst case. A million sources measure the same (18.3 MiB).
        """
        size = DEFAULT_TABLE_SIZE
        tracemalloc.start()
        try:
            policy = Policy(RateLimit(10, 50), table_size=size)
            admit = policy.admit
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for n in range(300_000):
                packed = n.to_bytes(4, "big")
                admit(packed, CLIENT_PORT, n * 1e-6, False, True)
                admit(packed, CLIENT_PORT, n * 1e-6 + 0.5, False, True)
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertEqual(len(policy), size)
        per_entry = (current - before) / size
        self.assertLess(per_entry, 320, f"{per_entry:.0f} bytes per entry")
        self.assertLess(
            peak - before, 25 * 2**20, f"peak {(peak - before) / 2**20:.1f} MiB"
        )


class GroupingTests(unittest.TestCase):
    def test_one_ipv6_64_shares_a_bucket(self) -> None:
        policy = Policy(RateLimit(1, 10))
        self.assertEqual(answers(policy, "2001:db8:0:1::1", 0.0, 6), 6)
        self.assertEqual(answers(policy, "2001:db8:0:1:ffff:ffff:ffff:ffff", 0.0, 6), 4)
        self.assertEqual(len(policy), 1)

    def test_different_ipv6_64s_do_not(self) -> None:
        policy = Policy(RateLimit(1, 10))
        self.assertEqual(answers(policy, "2001:db8:0:1::1", 0.0, 20), 10)
        self.assertEqual(answers(policy, "2001:db8:0:2::1", 0.0, 20), 10)
        self.assertEqual(len(policy), 2)

    def test_ipv4_is_per_address(self) -> None:
        policy = Policy(RateLimit(1, 10))
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 20), 10)
        self.assertEqual(answers(policy, "192.0.2.2", 0.0, 20), 10)

    def test_ipv4_mapped_is_the_ipv4_address(self) -> None:
        policy = Policy(RateLimit(1, 10))
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 6), 6)
        self.assertEqual(answers(policy, "::ffff:192.0.2.1", 0.0, 6), 4)
        self.assertEqual(len(policy), 1)
        self.assertIn(pack_host("::ffff:192.0.2.1"), policy)
        # ... and not the IPv6 /64 ::/64 that holds every mapped address.
        self.assertEqual(answers(policy, "::ffff:192.0.2.2", 0.0, 20), 10)


class AccessListTests(unittest.TestCase):
    def test_deny(self) -> None:
        policy = Policy(RateLimit(10, 50), deny=["192.0.2.0/24", "2001:db8:bad::/48"])
        self.assertIs(text(policy, "192.0.2.9", 0.0), DENY)
        self.assertIs(text(policy, "2001:db8:bad:1::1", 0.0), DENY)
        self.assertIs(text(policy, "198.51.100.1", 0.0), ANSWER)
        self.assertIs(text(policy, "2001:db8:600d::1", 0.0), ANSWER)

    def test_any_allow_serves_only_allowed_sources(self) -> None:
        policy = Policy(RateLimit(10, 50), allow=["192.0.2.0/24"])
        self.assertIs(text(policy, "192.0.2.9", 0.0), ANSWER)
        self.assertIs(text(policy, "198.51.100.1", 0.0), DENY)
        # No IPv6 allow at all: every IPv6 source is refused.
        self.assertIs(text(policy, "2001:db8::1", 0.0), DENY)

    def test_ipv6_allow(self) -> None:
        policy = Policy(None, allow=["2001:db8::/32", "fd00::/8"])
        self.assertIs(text(policy, "2001:db8:1::1", 0.0), ANSWER)
        self.assertIs(text(policy, "fd12::1", 0.0), ANSWER)
        self.assertIs(text(policy, "2001:db9::1", 0.0), DENY)
        self.assertIs(text(policy, "192.0.2.1", 0.0), DENY)

    def test_deny_wins_over_allow(self) -> None:
        for rate_limit in (None, RateLimit(10, 50)):
            policy = Policy(
                rate_limit,
                allow=["10.0.0.0/8", "10.1.2.3", "2001:db8::/32"],
                deny=["10.1.0.0/16", "2001:db8:bad::/48", "::/0"],
            )
            self.assertIs(text(policy, "10.9.9.9", 0.0), ANSWER)
            self.assertIs(text(policy, "10.1.9.9", 0.0), DENY)
            self.assertIs(text(policy, "10.1.2.3", 0.0), DENY)
            self.assertIs(text(policy, "2001:db8::1", 0.0), DENY)

    def test_mapped_sources_meet_ipv4_rules(self) -> None:
        policy = Policy(RateLimit(10, 50), allow=["192.0.2.0/24"], deny=["192.0.2.66"])
        self.assertIs(text(policy, "::ffff:192.0.2.9", 0.0), ANSWER)
        self.assertIs(text(policy, "::ffff:192.0.2.66", 0.0), DENY)
        self.assertIs(text(policy, "::ffff:198.51.100.1", 0.0), DENY)

    def test_mapped_rules_meet_ipv4_sources(self) -> None:
        for rule in (
            "::ffff:192.0.2.0/120",
            ipaddress.ip_network("::ffff:c000:200/120"),
        ):
            policy = Policy(None, deny=[rule])
            self.assertIs(text(policy, "192.0.2.9", 0.0), DENY)
            self.assertIs(text(policy, "::ffff:192.0.2.9", 0.0), DENY)
            self.assertIs(text(policy, "198.51.100.1", 0.0), ANSWER)

    def test_rules_finer_than_64_are_checked_on_every_datagram(self) -> None:
        policy = Policy(RateLimit(10, 50), deny=["2001:db8::bad"])
        self.assertIs(text(policy, "2001:db8::1", 0.0), ANSWER)
        self.assertIn(pack_host("2001:db8::bad"), policy)  # same /64, same bucket
        self.assertIs(text(policy, "2001:db8::bad", 0.0), DENY)
        allowing = Policy(RateLimit(10, 50), allow=["2001:db8::1"])
        self.assertIs(text(allowing, "2001:db8::1", 0.0), ANSWER)
        self.assertIs(text(allowing, "2001:db8::2", 0.0), DENY)

    def test_networks_may_be_given_parsed(self) -> None:
        networks: list[str | Network] = [ipaddress.ip_network("192.0.2.0/24")]
        policy = Policy(None, deny=networks)
        self.assertIs(text(policy, "192.0.2.1", 0.0), DENY)

    def test_bad_network_is_refused(self) -> None:
        self.assertRaises(ValueError, Policy, allow=["10.0.0.1/8"])

    def test_deny_kiss_only_for_formats_that_can(self) -> None:
        policy = Policy(RateLimit(10, 50), deny=["192.0.2.0/24"], deny_kiss=True)
        self.assertIs(ntp(policy, "192.0.2.1", 0.0), DENY_KISS)
        self.assertIs(text(policy, "192.0.2.1", 0.0), DENY)
        quiet = Policy(RateLimit(10, 50), deny=["192.0.2.0/24"])
        self.assertIs(ntp(quiet, "192.0.2.1", 0.0), DENY)

    def test_denied_sources_take_no_tokens_or_entries(self) -> None:
        policy = Policy(RateLimit(1, 5), deny=["192.0.2.0/24"], table_size=1)
        text(policy, "198.51.100.1", 0.0)
        for n in range(100):
            self.assertIs(text(policy, f"192.0.2.{n}", 0.0), DENY)
        self.assertEqual(len(policy), 1)
        self.assertIn(pack_host("198.51.100.1"), policy)


class LoopGuardTests(unittest.TestCase):
    def test_port_zero_is_never_answered(self) -> None:
        policy = Policy(None)
        self.assertIs(text(policy, "192.0.2.1", 0.0, port=0), IGNORE)
        self.assertIs(ntp(policy, "192.0.2.1", 0.0, port=0), IGNORE)
        self.assertIs(
            Policy(None, loop_ports=()).admit(
                pack_host("192.0.2.1"), 0, 0.0, False, True
            ),
            IGNORE,
        )

    def test_text_formats_ignore_echoing_services(self) -> None:
        policy = Policy(RateLimit(10, 50))
        self.assertEqual(DEFAULT_LOOP_PORTS, {7, 13, 17, 19, 37})
        for port in (7, 13, 17, 19, 37):
            self.assertIs(text(policy, "192.0.2.1", 0.0, port=port), IGNORE)
        self.assertIs(text(policy, "192.0.2.1", 0.0, port=123), ANSWER)

    def test_ntp_answers_them_and_port_123(self) -> None:
        policy = Policy(RateLimit(10, 50))
        for port in (7, 13, 17, 19, 37, 123):
            self.assertIs(ntp(policy, "192.0.2.1", 0.0, port=port), ANSWER)

    def test_ports_are_configurable(self) -> None:
        policy = Policy(None, loop_ports={5353})
        self.assertIs(text(policy, "192.0.2.1", 0.0, port=5353), IGNORE)
        self.assertIs(text(policy, "192.0.2.1", 0.0, port=7), ANSWER)

    def test_guard_comes_before_the_access_lists(self) -> None:
        policy = Policy(None, deny=["192.0.2.0/24"], deny_kiss=True)
        self.assertIs(ntp(policy, "192.0.2.1", 0.0, port=0), IGNORE)

    def test_guarded_datagrams_take_no_tokens_or_entries(self) -> None:
        policy = Policy(RateLimit(1, 5))
        for _ in range(100):
            text(policy, "192.0.2.1", 0.0, port=19)
            text(policy, "192.0.2.1", 0.0, port=0)
        self.assertEqual(len(policy), 0)
        self.assertEqual(answers(policy, "192.0.2.1", 0.0, 10), 5)


# -- properties -------------------------------------------------------------

arrivals = st.lists(
    st.floats(min_value=0.0, max_value=5.0, allow_nan=False), min_size=1, max_size=120
).map(lambda gaps: [sum(gaps[: i + 1]) for i in range(len(gaps))])
rates = st.floats(min_value=0.01, max_value=1000.0)
bursts = st.integers(min_value=1, max_value=30)
addresses = st.one_of(
    st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)
)
mapped = st.binary(min_size=4, max_size=4).map(lambda b: bytes(10) + b"\xff\xff" + b)
networks = st.one_of(
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=4),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.ip_network((a, n), strict=False),
        st.ip_addresses(v=6),
        st.integers(0, 128),
    ),
)


def _reference_refused(
    packed: bytes, allow: list[Network], deny: list[Network]
) -> bool:
    address = ipaddress.ip_address(packed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    if any(address in n for n in deny):
        return True
    return bool(allow) and not any(address in n for n in allow)


class PropertyTests(unittest.TestCase):
    @settings(deadline=None)
    @given(arrivals, rates, bursts, st.integers(0, 3))
    def test_answers_in_any_window_fit_the_bucket(
        self, times: list[float], rate: float, burst: int, per_instant: int
    ) -> None:
        policy = Policy(RateLimit(rate, burst))
        answered = [
            now
            for now in times
            for _ in range(per_instant + 1)
            if text(policy, "192.0.2.1", now) is ANSWER
        ]
        for i, start in enumerate(answered):
            for j in range(i, len(answered)):
                count = j - i + 1
                # _SLACK (1e-6 tokens) and float rounding, no more.
                self.assertLessEqual(count, burst + rate * (answered[j] - start) + 2e-6)

    @settings(deadline=None)
    @given(
        st.lists(st.integers(0, 4000), min_size=1, max_size=80),
        st.integers(-3, 4),
        bursts,
    )
    def test_matches_an_exact_token_bucket(
        self, steps: list[int], rate_exponent: int, burst: int
    ) -> None:
        # Dyadic rates and times keep the float arithmetic exact, so every
        # decision must match a token bucket kept in fractions.
        rate = Fraction(2) ** rate_exponent
        policy = Policy(RateLimit(float(rate), burst))
        tokens, last = Fraction(burst), Fraction(0)
        now = Fraction(0)
        for step in steps:
            now += Fraction(step, 64)
            tokens = min(Fraction(burst), tokens + (now - last) * rate)
            last = now
            expected = tokens >= 1
            if expected:
                tokens -= 1
            got = text(policy, "192.0.2.1", float(now))
            self.assertEqual(got is ANSWER, expected)

    @settings(deadline=None)
    @given(arrivals, rates, bursts)
    def test_kisses_are_a_period_apart(
        self, times: list[float], rate: float, burst: int
    ) -> None:
        policy = Policy(RateLimit(rate, burst))
        kisses = [
            now
            for now in times
            for _ in range(3)
            if ntp(policy, "192.0.2.1", now) is KISS
        ]
        period = burst / rate
        for earlier, later in pairwise(kisses):
            self.assertGreaterEqual(later - earlier, period)

    @given(st.lists(st.integers(0, 30), max_size=200), st.integers(1, 8))
    def test_table_is_bounded_and_least_recently_used(
        self, sources: list[int], size: int
    ) -> None:
        policy = Policy(RateLimit(1, 1), table_size=size)
        model: OrderedDict[int, None] = OrderedDict()
        for source in sources:
            policy.admit(source.to_bytes(4, "big"), CLIENT_PORT, 0.0, False, True)
            model[source] = None
            model.move_to_end(source)
            if len(model) > size:
                model.popitem(last=False)
            self.assertLessEqual(len(policy), size)
        for source in range(31):
            self.assertEqual(source.to_bytes(4, "big") in policy, source in model)

    @settings(deadline=None)
    @given(
        st.lists(st.one_of(addresses, mapped), max_size=10),
        st.lists(networks, max_size=6),
        st.lists(networks, max_size=6),
        st.booleans(),
        st.data(),
    )
    def test_access_lists_match_ipaddress(
        self,
        random_sources: list[bytes],
        allow: list[Network],
        deny: list[Network],
        limited: bool,
        data: st.DataObject,
    ) -> None:
        # Sources at and next to each rule's edges, in the same /64 or not,
        # so the table-hit shortcut meets rules finer than its key.
        near = [
            (int(n.network_address) ^ flip).to_bytes(n.max_prefixlen // 8, "big")
            for n in allow + deny
            for flip in (0, 1, 1 << 8, 1 << 63, 1 << 64)
            if flip < 1 << n.max_prefixlen
        ]
        sources = data.draw(st.permutations(random_sources + near))
        policy = Policy(
            RateLimit(1, 1000) if limited else None,
            allow=list(allow),
            deny=list(deny),
        )
        allow4 = [parse_cidr(str(n)) for n in allow]
        deny4 = [parse_cidr(str(n)) for n in deny]
        # Twice each: the second datagram may take the table-hit shortcut.
        for packed in sources * 2:
            refused = _reference_refused(packed, allow4, deny4)
            got = policy.admit(packed, CLIENT_PORT, 0.0, False, True)
            self.assertEqual(got is DENY, refused, ipaddress.ip_address(packed))

    @settings(deadline=None)
    @given(
        st.lists(
            st.tuples(
                addresses,
                st.integers(0, 65535),
                st.floats(),
                st.booleans(),
                st.booleans(),
            ),
            max_size=50,
        ),
        st.integers(1, 4),
        st.integers(0, 3),
        st.booleans(),
    )
    def test_admit_never_raises(
        self,
        datagrams: list[tuple[bytes, int, float, bool, bool]],
        size: int,
        leak: int,
        deny_kiss: bool,
    ) -> None:
        policy = Policy(
            RateLimit(2, 3),
            table_size=size,
            leak=leak,
            allow=["0.0.0.0/1", "2001:db8::/32", "2001:db8::1/128"],
            deny=["10.0.0.0/8", "2001:db8:bad::/48", "2001:db8::2"],
            deny_kiss=deny_kiss,
        )
        for packed, port, now, can_kiss, echoes in datagrams:
            self.assertIsInstance(
                policy.admit(packed, port, now, can_kiss, echoes), Decision
            )
            self.assertLessEqual(len(policy), size)


def table_state(policy: Policy) -> list[tuple[bytes, tuple[float, float, int, float]]]:
    """The table in order, compact entries spelled out as the bucket they stand for."""
    burst = float(policy.rate_limit.burst) if policy.rate_limit else 0.0
    out = []
    for key, value in policy._table.items():
        if isinstance(value, list):
            out.append((key, (burst - 1.0, value[0], 0, float("-inf"))))
        else:
            out.append((key, (value.tokens, value.stamp, value.over, value.kissed)))
    return out


v4_pool = [bytes([192, 0, 2, i]) for i in range(1, 9)] + [bytes([10, 0, 0, 1])]
v6_pool = [
    bytes.fromhex("20010db8000000010000000000000001"),
    bytes.fromhex("20010db8000000010000000000000002"),  # same /64
    bytes.fromhex("20010db8000000020000000000000001"),
    bytes.fromhex("20010db8000000030000000000000009"),
    bytes.fromhex("20010db8000000000000000000000002"),  # denied /128
]
mapped_pool = [bytes(10) + b"\xff\xff" + a for a in v4_pool]


class BatchAdmissionTests(unittest.TestCase):
    """admit_batch decides and leaves the table exactly as admit one by one."""

    @settings(max_examples=300, deadline=None)
    @given(
        pool=st.sampled_from([v4_pool, v6_pool, mapped_pool, v6_pool + mapped_pool]),
        batches=st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from([0.0, 1e-9, 0.05, 0.1, 0.1000001, 0.25, 1.0, 7.0]),
                    st.floats(-2.0, 10.0),
                ),
                st.lists(
                    st.tuples(st.integers(0, 8), st.sampled_from([40000, 123, 7, 0])),
                    min_size=1,
                    max_size=12,
                ),
            ),
            min_size=1,
            max_size=12,
        ),
        limit=st.sampled_from(
            [
                None,
                RateLimit(10, 50),
                RateLimit(10, 1),
                RateLimit(2, 3),
                RateLimit(1e3, 2),
            ]
        ),
        size=st.sampled_from([2, 4, 64]),
        leak=st.sampled_from([0, 2]),
        acl=st.booleans(),
        can_kiss=st.booleans(),
        echoes=st.booleans(),
    )
    def test_same_as_one_by_one(
        self,
        pool: list[bytes],
        batches: list[tuple[float, list[tuple[int, int]]]],
        limit: RateLimit | None,
        size: int,
        leak: int,
        acl: bool,
        can_kiss: bool,
        echoes: bool,
    ) -> None:
        def make() -> Policy:
            return Policy(
                limit,
                table_size=size,
                leak=leak,
                deny=["10.0.0.0/8", "2001:db8::2/128"] if acl else [],
                deny_kiss=True,
            )

        batched, single = make(), make()
        now = 1000.0
        for step, items in batches:
            now += step
            packed = [pool[i % len(pool)] for i, _ in items]
            ports = [p for _, p in items]
            expected = [
                single.admit(a, p, now, can_kiss, echoes) for a, p in zip(packed, ports)
            ]
            got = batched.admit_batch(packed, ports, now, can_kiss, echoes)
            self.assertEqual([ANSWER] * len(items) if got is None else got, expected)
            self.assertEqual(table_state(batched), table_state(single))

    def test_full_sources_are_decided_without_admit(self) -> None:
        calls: list[bytes] = []

        class Counting(Policy):
            def admit(self, packed: bytes, *args: Any) -> Decision:
                calls.append(packed)
                return super().admit(packed, *args)

        policy = Counting(RateLimit(10, 50))
        sources = [n.to_bytes(4, "big") for n in range(1, 65)]
        ports = [CLIENT_PORT] * 64
        self.assertIsNone(policy.admit_batch(sources, ports, 0.0, True, False))
        self.assertEqual(len(calls), 64)  # new sources: one by one
        calls.clear()
        self.assertIsNone(policy.admit_batch(sources, ports, 0.5, True, False))
        self.assertEqual(calls, [])
        # Back within a tenth of a second, no source is sure to be full.
        self.assertIsNone(policy.admit_batch(sources, ports, 0.55, True, False))
        self.assertEqual(len(calls), 64)

    def test_sources_over_their_limit_alone_take_admit(self) -> None:
        policy = Policy(RateLimit(1, 1))
        sources = [bytes([192, 0, 2, n]) for n in range(1, 9)]
        ports = [CLIENT_PORT] * 8
        policy.admit_batch(sources, ports, 0.0, True, False)
        # Source 1 comes back at once: over its limit, kissed.
        self.assertEqual(
            policy.admit_batch(sources[:1], ports[:1], 0.0, True, False), [KISS]
        )
        # Half a second on: over again, within its kiss period; source 2 over.
        self.assertEqual(
            policy.admit_batch(sources[:2], ports[:2], 0.5, True, False), [DROP, KISS]
        )
        self.assertIsNone(policy.admit_batch(sources, ports, 2.0, True, False))
