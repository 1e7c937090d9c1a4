"""The NTS-KE connection table: caps, eviction order, bookkeeping."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.nts.slots import Slot, SlotTable, Stage, address_keys


def v4(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, text)


def v6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


class SlotTableTests(unittest.TestCase):
    def test_keys(self) -> None:
        self.assertEqual(address_keys(v4("192.0.2.1")), (v4("192.0.2.1"),) * 2)
        address, network = address_keys(v6("2001:db8::1"))
        self.assertEqual((address, network), (v6("2001:db8::1"), v6("2001:db8::")[:8]))
        self.assertEqual(address_keys(v6("::ffff:192.0.2.1")), (v4("192.0.2.1"),) * 2)

    def test_eviction_order(self) -> None:
        table: SlotTable[str] = SlotTable(total=3)
        slots = {}
        for name in "abc":
            slot, why, evicted = table.admit(v4(f"192.0.2.{ord(name)}"), name)
            assert slot is not None
            self.assertEqual((why, evicted), ("", None))
            slots[name] = slot
        slots["a"].advance(Stage.HANDSHAKE)
        slots["b"].advance(Stage.SESSION)
        # c is the oldest silent one, then a the oldest handshake.
        d, _, evicted = table.admit(v4("192.0.2.100"), "d")
        self.assertIs(evicted, slots["c"])
        self.assertFalse(slots["c"].held)
        assert d is not None
        d.advance(Stage.SESSION)
        _, _, evicted = table.admit(v4("192.0.2.101"), "e")
        self.assertIs(evicted, slots["a"])
        self.assertEqual(len(table), 3)
        self.assertEqual(table.count(Stage.SESSION), 2)

    def test_full_of_sessions(self) -> None:
        table: SlotTable[None] = SlotTable(total=1)
        slot, _, _ = table.admit(v4("192.0.2.1"))
        assert slot is not None
        slot.advance(Stage.SESSION)
        self.assertEqual(
            table.admit(v4("192.0.2.2")), (None, "1 connections busy", None)
        )
        slot.release()
        slot.release()
        self.assertEqual(len(table), 0)
        self.assertIsNotNone(table.admit(v4("192.0.2.2"))[0])

    def test_no_going_back(self) -> None:
        table: SlotTable[None] = SlotTable()
        slot, _, _ = table.admit(v4("192.0.2.1"))
        assert slot is not None
        slot.advance(Stage.SESSION)
        slot.advance(Stage.HANDSHAKE)
        self.assertEqual(slot.stage, Stage.SESSION)
        slot.release()
        slot.advance(Stage.SESSION)
        self.assertEqual(len(table), 0)

    def test_caps(self) -> None:
        table: SlotTable[None] = SlotTable(total=100, per_address=2, per_network=3)
        admitted = [table.admit(v6(f"2001:db8::{n}"))[0] is not None for n in range(4)]
        self.assertEqual(admitted, [True, True, True, False])
        self.assertIn("/64", table.admit(v6("2001:db8::9"))[1])
        self.assertIsNotNone(table.admit(v4("192.0.2.1"))[0])
        self.assertIsNotNone(table.admit(v4("192.0.2.1"))[0])
        self.assertIn("one address", table.admit(v4("192.0.2.1"))[1])

    def test_bad_caps(self) -> None:
        with self.assertRaises(ValueError):
            SlotTable(total=0)

    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["admit", "advance", "release"]),
                st.integers(0, 7),
                st.sampled_from([Stage.HANDSHAKE, Stage.SESSION]),
            ),
            max_size=60,
        )
    )
    def test_bookkeeping(self, steps: list[tuple[str, int, Stage]]) -> None:
        """Whatever happens, the counts match the slots held and the caps hold."""
        table: SlotTable[int] = SlotTable(total=5, per_address=2, per_network=3)
        held: list[Slot[int]] = []
        for n, (op, which, stage) in enumerate(steps):
            if op == "admit":
                packed = v6(f"2001:db8:0:{which % 3}::{which}")
                before = {id(s) for s in held if s.stage == Stage.SESSION}
                slot, why, evicted = table.admit(packed, n)
                if evicted is not None:
                    self.assertNotIn(id(evicted), before)  # sessions stay
                    held.remove(evicted)
                if slot is None:
                    self.assertTrue(why)
                else:
                    held.append(slot)
            elif held:
                slot = held[which % len(held)]
                if op == "advance":
                    slot.advance(stage)
                else:
                    slot.release()
                    held.remove(slot)
            self.assertEqual(len(table), len(held))
            self.assertLessEqual(len(table), 5)
            self.assertTrue(all(s.held for s in held))
            for slot in held:
                same = [s for s in held if s.address == slot.address]
                self.assertLessEqual(len(same), 2)
                self.assertLessEqual(
                    len([s for s in held if s.network == slot.network]), 3
                )
