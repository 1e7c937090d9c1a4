"""The typed configuration: frozen, its parsers, its JSON for workers; describe."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.python import usage
from twisted.trial import unittest

from udptime import __version__
from udptime.config import (
    Config,
    MetricsConfig,
    NtpConfig,
    NtsConfig,
    PolicyConfig,
    RoughtimeConfig,
    coerce,
    parse_count,
    parse_ports,
    parse_positive,
    parse_seconds,
    parse_stratum,
)
from udptime.describe import describe
from udptime.listenspec import ListenSpec
from udptime.policy import RateLimit
from udptime.worker import read_config

#: Every field away from its default, every optional part present.
FULL = Config(
    listeners=(
        ListenSpec("ntp", "::1", 20123),
        ListenSpec("time", "", 0),
        ListenSpec("ctime", "systemd", 1),
    ),
    policy=PolicyConfig(
        rate_limit=RateLimit(0.1, 3),
        table_size=7,
        leak=2,
        allow=(
            ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        deny=(ipaddress.ip_network("10.1.2.3/32"),),
        deny_kiss=True,
        loop_ports=frozenset({0, 9, 65535}),
        allow_file="/etc/udptime/allow.txt",
        deny_file="deny list.txt",
    ),
    ntp=NtpConfig(stratum=15, local_stratum=1, refid=bytes([192, 0, 2, 255])),
    nts=NtsConfig(
        ke_host="::",
        ke_port=4460,
        tls_cert="/etc/cert.pem",
        tls_key="key with spaces ü.pem",
        keys_file="keys.json",
        key_secret="/run/credentials/udptime.service/nts-key-secret",
        key_secret_accept="old secret.hex",
        servers=(("time.example", None), ("::1", 1123)),
        rotate=3600.5,
        ke_rate_limit=None,
        ke_connections=5,
        ke_timeout=2.25,
    ),
    metrics=MetricsConfig("0.0.0.0", 9100),
    roughtime=RoughtimeConfig(delegation_file="host.json", local_radius=7),
    workers=4,
    receive_buffer=0,
    batch=False,
    verbose=True,
    summary_interval=0,
)


class RecordTests(unittest.TestCase):
    def test_frozen(self) -> None:
        config = Config()
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.workers = 2  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.ntp.stratum = 3  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            FULL.nts.rotate = 1.0  # type: ignore[misc,union-attr]
        # slots: no attribute can be added by a typo either
        self.assertFalse(hasattr(config, "__dict__"))

    def test_every_field_away_from_default(self) -> None:
        # so the round trip below exercises every field
        for record, default in (
            (FULL, Config()),
            (FULL.policy, PolicyConfig()),
            (FULL.ntp, NtpConfig()),
        ):
            for field in dataclasses.fields(record):
                self.assertNotEqual(
                    getattr(record, field.name), getattr(default, field.name), field
                )

    def test_json_round_trip(self) -> None:
        for config in (
            Config(),
            FULL,
            dataclasses.replace(FULL, nts=None),
            dataclasses.replace(FULL, roughtime=RoughtimeConfig(key_file="root.pem")),
        ):
            text = config.to_json()
            self.assertNotIn("\n", text)  # one line on the worker's stdin
            self.assertEqual(Config.from_json(text), config)

    @given(
        rate=st.floats(min_value=1e-9, max_value=1e9),
        burst=st.integers(1, 2**40),
        refid=st.binary(min_size=4, max_size=4),
    )
    def test_json_round_trip_exact_values(
        self, rate: float, burst: int, refid: bytes
    ) -> None:
        config = dataclasses.replace(
            FULL,
            policy=dataclasses.replace(FULL.policy, rate_limit=RateLimit(rate, burst)),
            ntp=dataclasses.replace(FULL.ntp, refid=refid),
        )
        self.assertEqual(Config.from_json(config.to_json()), config)

    def test_read_by_a_worker_from_a_pipe(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        with os.fdopen(write, "wb") as pipe:
            pipe.write(FULL.to_json().encode() + b"\n")
        self.assertEqual(read_config(read), FULL)

    def test_worker_stdin_closed_early(self) -> None:
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        with os.fdopen(write, "wb") as pipe:
            pipe.write(b'{"listeners": ')
        with self.assertRaises(SystemExit):
            read_config(read)


class ParserTests(unittest.TestCase):
    def test_stratum(self) -> None:
        self.assertEqual([parse_stratum(t) for t in ("1", "15")], [1, 15])
        for text in ("0", "16", "-1", "two", "", "2.0"):
            with self.assertRaises(ValueError, msg=text):
                parse_stratum(text)

    def test_numbers(self) -> None:
        self.assertEqual(parse_count("0"), 0)
        self.assertEqual(parse_positive("1"), 1)
        self.assertEqual(parse_seconds("0.5"), 0.5)
        for parse, text in (
            (parse_count, "-1"),
            (parse_count, "x"),
            (parse_positive, "0"),
            (parse_positive, "1.5"),
            (parse_seconds, "0"),
            (parse_seconds, "nan"),
            (parse_seconds, "inf"),
            (parse_seconds, "-3"),
        ):
            with self.assertRaises(ValueError, msg=(parse, text)):
                parse(text)

    def test_ports(self) -> None:
        self.assertEqual(parse_ports("7, 13,,0"), frozenset({0, 7, 13}))
        self.assertEqual(parse_ports(""), frozenset())
        for text in ("7,65536", "7;13", "-1"):
            with self.assertRaises(ValueError, msg=text):
                parse_ports(text)

    def test_coerce_names_the_option_once(self) -> None:
        def named(text: str) -> str:
            raise ValueError(f"--listen {text!r}: bad")

        with self.assertRaises(usage.UsageError) as caught:
            coerce("--workers", parse_positive)("0")
        self.assertEqual(
            str(caught.exception), "--workers: expected a number >= 1, not '0'"
        )
        with self.assertRaises(usage.UsageError) as caught:
            coerce("--listen", named)("x")
        self.assertEqual(str(caught.exception), "--listen 'x': bad")


class DescribeTests(unittest.TestCase):
    def test_describe(self) -> None:
        description = describe()
        self.assertEqual(description["version"], __version__)
        self.assertEqual(
            description["formats"], ["ctime", "daytime", "ntp", "roughtime", "time"]
        )
        options = description["options"]
        self.assertEqual(
            options["--port"],
            {
                "short": "-p",
                "value": True,
                "default": "20000",
                "help": "UDP port to serve.",
            },
        )
        self.assertFalse(options["--no-batch"]["value"])
        self.assertTrue(options["--listen"]["value"])
        for name in (
            "--workers",
            "--nts-ke",
            "--allow",
            "--local-stratum",
            "--roughtime-key",
        ):
            self.assertIn(name, options)

    def test_command(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "udptime.describe"],
            capture_output=True,
            check=True,
            timeout=60,
        )
        self.assertEqual(json.loads(done.stdout), describe())
