"""The text encoders at fixed instants, and the format registry."""

from __future__ import annotations

import calendar
import datetime
import os
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from udptime.formats import (
    EPOCH_1900_TO_1970,
    encode_ctime,
    encode_daytime,
    encode_time,
)
from udptime.registry import Context, format_names, get_format
from udptime.responders.text import TextResponder


def utc(*args: int) -> int:
    return calendar.timegm(datetime.datetime(*args).timetuple())  # type: ignore[arg-type]


class TimeFormatTests(unittest.TestCase):
    """RFC 868: seconds since 1900, 32 bits, big-endian, modulo 2**32."""

    def test_1900(self) -> None:
        self.assertEqual(encode_time(-EPOCH_1900_TO_1970), b"\x00\x00\x00\x00")

    def test_1970(self) -> None:
        self.assertEqual(encode_time(0), (2_208_988_800).to_bytes(4, "big"))
        self.assertEqual(encode_time(0), b"\x83\xaa\x7e\x80")

    def test_last_second_of_era_0(self) -> None:
        self.assertEqual(encode_time(utc(2036, 2, 7, 6, 28, 15)), b"\xff\xff\xff\xff")

    def test_wraps_on_2036_02_07(self) -> None:
        self.assertEqual(encode_time(utc(2036, 2, 7, 6, 28, 16)), b"\x00\x00\x00\x00")
        self.assertEqual(encode_time(utc(2036, 2, 7, 6, 28, 17)), b"\x00\x00\x00\x01")

    def test_leap_day(self) -> None:
        moment = utc(2024, 2, 29, 12, 0, 0)
        self.assertEqual(
            int.from_bytes(encode_time(moment), "big"),
            moment + EPOCH_1900_TO_1970,
        )

    def test_fraction_is_truncated(self) -> None:
        self.assertEqual(encode_time(0.999), encode_time(0))
        self.assertEqual(encode_time(-0.5), encode_time(-1))

    @given(st.integers(min_value=-(2**40), max_value=2**40))
    def test_always_four_bytes_mod_2_32(self, seconds: int) -> None:
        reply = encode_time(seconds)
        self.assertEqual(len(reply), 4)
        self.assertEqual(
            int.from_bytes(reply, "big"), (seconds + EPOCH_1900_TO_1970) % 2**32
        )


class DaytimeFormatTests(unittest.TestCase):
    """RFC 867 daytime as an RFC 3339 UTC line."""

    def test_1900(self) -> None:
        self.assertEqual(
            encode_daytime(-EPOCH_1900_TO_1970), b"1900-01-01T00:00:00Z\r\n"
        )

    def test_1970(self) -> None:
        self.assertEqual(encode_daytime(0), b"1970-01-01T00:00:00Z\r\n")

    def test_2036_wrap_instant(self) -> None:
        self.assertEqual(
            encode_daytime(utc(2036, 2, 7, 6, 28, 16)), b"2036-02-07T06:28:16Z\r\n"
        )

    def test_leap_days(self) -> None:
        self.assertEqual(
            encode_daytime(utc(2024, 2, 29, 23, 59, 59)),
            b"2024-02-29T23:59:59Z\r\n",
        )
        self.assertEqual(
            encode_daytime(utc(2000, 2, 29, 0, 0, 0)), b"2000-02-29T00:00:00Z\r\n"
        )
        # 2100 is not a leap year: the day after Feb 28 is Mar 1.
        self.assertEqual(
            encode_daytime(utc(2100, 2, 28, 0, 0, 0) + 86_400),
            b"2100-03-01T00:00:00Z\r\n",
        )

    def test_fraction_truncated(self) -> None:
        self.assertEqual(encode_daytime(59.9), b"1970-01-01T00:00:59Z\r\n")

    @given(st.integers(min_value=utc(1, 1, 1, 0, 0, 0), max_value=utc(9999, 1, 1)))
    def test_matches_datetime(self, seconds: int) -> None:
        expected = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)
        self.assertEqual(
            encode_daytime(seconds),
            f"{expected.year:04d}-{expected.month:02d}-{expected.day:02d}T"
            f"{expected:%H:%M:%S}Z\r\n".encode("ascii"),
        )


class CtimeFormatTests(unittest.TestCase):
    """The recipe's reply: ``time.ctime()``, local time, no newline."""

    def setUp(self) -> None:
        self._tz = os.environ.get("TZ")
        os.environ["TZ"] = "UTC"
        time.tzset()

    def tearDown(self) -> None:
        if self._tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = self._tz
        time.tzset()

    def test_1970(self) -> None:
        self.assertEqual(encode_ctime(0), b"Thu Jan  1 00:00:00 1970")

    def test_leap_day(self) -> None:
        self.assertEqual(
            encode_ctime(utc(2012, 2, 29, 20, 35, 8)), b"Wed Feb 29 20:35:08 2012"
        )

    def test_2036(self) -> None:
        self.assertEqual(
            encode_ctime(utc(2036, 2, 7, 6, 28, 16)), b"Thu Feb  7 06:28:16 2036"
        )

    def test_1900(self) -> None:
        self.assertEqual(encode_ctime(-EPOCH_1900_TO_1970), b"Mon Jan  1 00:00:00 1900")

    def test_local_time(self) -> None:
        os.environ["TZ"] = "Asia/Tokyo"
        time.tzset()
        self.assertEqual(encode_ctime(0), b"Thu Jan  1 09:00:00 1970")


S = 1_000_000_000


class TextResponderTests(unittest.TestCase):
    def test_encodes_once_per_second(self) -> None:
        calls: list[float] = []

        def encode(moment: float) -> bytes:
            calls.append(moment)
            return str(moment).encode()

        cached = TextResponder(encode)
        self.assertEqual(cached.answer(b"", 10 * S + S // 10), b"10")
        self.assertEqual(cached.answer(b"x", 10 * S + 9 * S // 10), b"10")
        self.assertEqual(cached.answer(b"", 11 * S), b"11")
        self.assertEqual(calls, [10, 11])

    def test_batch_within_a_second_is_one_reply(self) -> None:
        cached = TextResponder(encode_time)
        replies, complete = cached.answer_batch([b"", b"abc", b"x" * 100], [S, S, S])
        self.assertEqual(replies, [encode_time(1)] * 3)
        self.assertEqual(list(complete), [])

    def test_batch_across_a_second_matches_one_by_one(self) -> None:
        cached = TextResponder(encode_time)
        times = [S - 1, S, 2 * S - 1]
        replies, _ = cached.answer_batch([b"", b"", b""], times)
        self.assertEqual(replies, [encode_time(0), encode_time(1), encode_time(1)])

    @given(
        st.lists(st.tuples(st.binary(max_size=30), st.integers(0, 3 * S)), max_size=70)
    )
    def test_batch_equals_one_by_one(self, batch: list[tuple[bytes, int]]) -> None:
        requests = [r for r, _ in batch]
        times = [t for _, t in batch]
        one = TextResponder(encode_time)
        replies, _ = TextResponder(encode_time).answer_batch(requests, times)
        self.assertEqual(replies, [one.answer(r, t) for r, t in batch])

    def test_a_time_reply_is_not_answered(self) -> None:
        cached = TextResponder(encode_ctime)
        echo = encode_ctime(1000)
        self.assertIsNone(cached.answer(echo, 1000 * S))
        replies, _ = cached.answer_batch([b"", echo], [1000 * S, 1000 * S])
        self.assertEqual(replies, [encode_ctime(1000), None])


class RegistryTests(unittest.TestCase):
    def test_text_formats_registered(self) -> None:
        context = Context(wall_clock_ns=lambda: 0, clock_state=lambda: NotImplemented)
        for name in ("ctime", "daytime", "time"):
            self.assertIn(name, format_names())
            fmt = get_format(name)
            self.assertEqual(fmt.name, name)
            self.assertTrue(fmt.make_responder(context).echoes_anything)

    def test_unknown_format_names_the_known_ones(self) -> None:
        with self.assertRaises(KeyError) as caught:
            get_format("nope")
        self.assertIn("ctime", caught.exception.args[0])
