"""What docs/fleet.md hands operators is true: the alert rules query metrics
the server exports (or that the dashboard lists as planned), the example role
files parse as udptime command lines, and the systemd template and drop-ins
load every credential they name."""

from __future__ import annotations

import re
import shlex
import shutil
import tempfile
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from twisted.python import usage
from twisted.trial import unittest

from tests.support import REPO
from tests.test_metrics_dashboard import metric_names, planned_names
from tests.test_metrics_site import http_get, serve_built, statuses
from udptime.nts.testing import make_certificate
from udptime.roughtime import keys
from udptime.tap import Options

RULES = REPO / "deploy" / "prometheus" / "udptime-rules.yml"
SCRAPE = REPO / "deploy" / "prometheus" / "fleet.yml"
TEMPLATE = REPO / "deploy" / "udptime@.service"
ROLES = REPO / "deploy" / "fleet"
_CREDENTIAL = re.compile(r"/run/credentials/udptime@(\w+)\.service/([\w-]+)")


def write_delegation(directory: Path) -> Path:
    """A fleet host's delegation file, from a root key made and dropped here."""
    now = int(time.time())
    path = directory / "roughtime-delegation"
    keys.write_delegation(path, keys.delegate(keys.generate_key(), now, now + 86_400))
    return path


def rule_expressions(text: str) -> list[str]:
    """The ``expr:`` of every rule, block scalars (``expr: |``) included."""
    expressions: list[str] = []
    lines = text.splitlines()
    for n, line in enumerate(lines):
        found = re.match(r"(\s*(?:-\s+)?)expr:\s*(.*)$", line)
        if found is None:
            continue
        indent, value = len(found.group(1)), found.group(2)
        if value != "|":
            expressions.append(value)
            continue
        block = []
        for following in lines[n + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following.strip())
        expressions.append(" ".join(block))
    return expressions


def environment_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as systemd reads them: comments, backslash continuation."""
    values: dict[str, str] = {}
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        key, _, value = (pending + line).partition("=")
        values[key.strip()] = value.strip()
        pending = ""
    return values


class RulesTests(unittest.TestCase):
    timeout = 60

    async def test_rules_query_exported_metrics(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="udptime-fleet-docs-"))
        self.addCleanup(shutil.rmtree, directory, True)
        cert, key = make_certificate(directory)
        # Every role of the fleet in one server: NTP, NTS-KE, Roughtime under
        # a delegation file.
        _, port = await serve_built(
            self,
            "--listen",
            "ntp@127.0.0.1:0",
            "--listen",
            "roughtime@127.0.0.1:0",
            "--roughtime-delegation",
            str(write_delegation(directory)),
            "--nts-ke",
            "127.0.0.1:0",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--nts-keys",
            str(directory / "keys.json"),
        )
        reply = await http_get(port, b"/metrics")
        self.assertEqual(statuses(reply), [200])
        body = reply.split(b"\r\n\r\n", 1)[1].decode()
        exported = {
            sample.name
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }
        # Prometheus' own: whether the scrape worked.
        known = exported | planned_names() | {"up"}
        expressions = rule_expressions(RULES.read_text())
        self.assertGreaterEqual(len(expressions), 5)
        for expr in expressions:
            names = metric_names(expr)
            self.assertTrue(names, expr)
            self.assertEqual(names - known, set(), expr)
        used = set().union(*(metric_names(e) for e in expressions))
        for name in (
            "udptime_clock_synchronised",
            "udptime_nts_naks_total",
            "udptime_roughtime_delegation_expiry_timestamp_seconds",
        ):
            self.assertIn(name, used)
            self.assertIn(name, exported)

    def test_block_expressions_read_whole(self) -> None:
        text = "  - expr: |\n      a\n        / b\n    for: 5m\n  - expr: c == 0\n"
        self.assertEqual(rule_expressions(text), ["a / b", "c == 0"])

    def test_scrape_configuration_labels_every_host(self) -> None:
        text = SCRAPE.read_text()
        targets = re.findall(
            r"targets: \[\"([^\"]+)\"\]\n\s+labels: \{host: (\w+)\}", text
        )
        self.assertGreaterEqual(len(targets), 4)
        self.assertEqual(len({host for _, host in targets}), len(targets))
        self.assertIn("udptime-rules.yml", text)


class RoleFileTests(unittest.TestCase):
    def test_role_files_are_udptime_command_lines(self) -> None:
        """Each role's options, with what the template adds, parse (files
        that only exist on a real host are made here)."""
        template = TEMPLATE.read_text()
        self.assertIn("EnvironmentFile=/etc/udptime/%i.conf", template)
        self.assertIn("--nts-key-secret %d/nts-key-secret $UDPTIME_OPTIONS", template)
        directory = Path(tempfile.mkdtemp(prefix="udptime-fleet-roles-"))
        self.addCleanup(shutil.rmtree, directory, True)
        secret = directory / "nts-key-secret"
        secret.write_text("00" * 32 + "\n")
        secret.chmod(0o400)  # as systemd's LoadCredential leaves it
        cert, key = make_certificate(directory)
        files = {
            "tls-cert": cert,
            "tls-key": key,
            "roughtime-delegation": write_delegation(directory),
        }
        roles = {path.stem: path for path in ROLES.glob("*.conf")}
        self.assertEqual(set(roles), {"ke", "ntp"})
        for role, path in roles.items():
            options = environment_file(path)["UDPTIME_OPTIONS"]
            for unit, name in _CREDENTIAL.findall(options):
                self.assertEqual(unit, role, options)
                options = options.replace(
                    f"/run/credentials/udptime@{role}.service/{name}", str(files[name])
                )
            parsed = Options()
            try:
                parsed.parseOptions(
                    ["--nts-key-secret", str(secret), *shlex.split(options)]
                )
            except usage.UsageError as exc:
                self.fail(f"{role}: {exc}")
            nts = parsed.config.nts
            assert nts is not None, role
            self.assertEqual(nts.key_secret, str(secret))
            formats = {spec.format for spec in parsed.config.listeners}
            if role == "ke":
                self.assertIsNotNone(nts.ke_port)
                self.assertNotIn("ntp", formats)
                self.assertGreaterEqual(len(nts.servers), 2)
                self.assertEqual(nts.tls_cert, str(cert))
            else:
                self.assertIsNone(nts.ke_port)
                self.assertIn("ntp", formats)
                self.assertIn("roughtime", formats)
                roughtime = parsed.config.roughtime
                assert roughtime is not None
                self.assertEqual(
                    roughtime.delegation_file, str(files["roughtime-delegation"])
                )
                self.assertIsNone(roughtime.key_file)  # the root key stays offline

    def test_every_credential_a_role_names_is_loaded(self) -> None:
        """A path under /run/credentials/udptime@ROLE.service/ in a role file
        is a LoadCredential= of the template or of that role's drop-in."""
        loaded: dict[str, set[str]] = {"ke": set(), "ntp": set()}
        template = set(
            re.findall(r"^LoadCredential=([\w-]+):", TEMPLATE.read_text(), re.MULTILINE)
        )
        self.assertIn("nts-key-secret", template)
        for role in loaded:
            loaded[role] |= template
            for drop_in in (ROLES / f"udptime@{role}.service.d").glob("*.conf"):
                text = drop_in.read_text()
                self.assertIn("[Service]", text)
                loaded[role] |= set(
                    re.findall(r"^LoadCredential=([\w-]+):/\S+$", text, re.MULTILINE)
                )
        named = {
            role: {name for _, name in _CREDENTIAL.findall(path.read_text())}
            for role, path in ((p.stem, p) for p in ROLES.glob("*.conf"))
        }
        self.assertEqual(named["ke"], {"tls-cert", "tls-key"})
        self.assertEqual(named["ntp"], {"roughtime-delegation"})
        for role, names in named.items():
            self.assertLessEqual(names, loaded[role], role)
