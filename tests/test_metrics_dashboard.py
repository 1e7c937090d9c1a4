"""The Grafana dashboard queries only metrics the server exports (or says are planned)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial import unittest

from tests.support import REPO
from tests.test_metrics_site import http_get, serve_built, statuses
from udptime.roughtime import keys

DASHBOARD = REPO / "deploy" / "grafana" / "udptime.json"
PLANNED = REPO / "deploy" / "grafana" / "planned-metrics.txt"

# PromQL words that look like metric names but are not.
_KEYWORDS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{[^}]*\}|\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    # label lists: by (...), without (...), on (...), ignoring (...), group_x (...)
    text = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text
    )
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        following = text[match.end() :].lstrip()
        if word in _KEYWORDS or following.startswith("("):
            continue  # an operator or a function call
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # the exponent or unit of a number: 1e3, 5m
        names.add(word)
    return names


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """``(panel title, panel description, PromQL)`` for every query, variables too."""
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], panel.get("description", ""), target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", text)
            assert match is not None, text
            yield f"variable {variable['name']}", "", match.group(1)


def planned_names() -> set[str]:
    lines = PLANNED.read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


class ExtractorTests(unittest.TestCase):
    def test_names_from_expressions(self) -> None:
        self.assertEqual(
            metric_names(
                'histogram_quantile(0.99, sum by (le, format) (rate(a_bucket{x=~"$x",'
                ' y="b c"}[$__rate_interval]))) / on (format) group_left b_total'
                " > bool 1e3 * c offset 5m"
            ),
            {"a_bucket", "b_total", "c"},
        )
        self.assertEqual(metric_names("min by (instance) (a) - time()"), {"a"})
        self.assertEqual(metric_names("sum(rate(x[5m])) or vector(0)"), {"x"})


class DashboardTests(unittest.TestCase):
    timeout = 60

    async def exported(self) -> set[str]:
        """Sample names from a real scrape of the real server, built in-process."""
        root = Path(tempfile.mkdtemp()) / "roughtime-root.pem"
        self.addCleanup(shutil.rmtree, root.parent)
        keys.write_root_key(root, keys.generate_key())
        _, port = await serve_built(
            self,
            "--listen", "ntp@127.0.0.1:0",
            "--listen", "ctime@127.0.0.1:0",
            "--listen", "roughtime@127.0.0.1:0",
            "--roughtime-key", str(root),
        )  # fmt: skip
        reply = await http_get(port, b"/metrics")
        self.assertEqual(statuses(reply), [200])
        body = reply.split(b"\r\n\r\n", 1)[1].decode()
        return {
            sample.name
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }

    async def test_every_queried_metric_is_exported_or_planned(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        exported = await self.exported()
        self.assertIn("udptime_response_seconds_bucket", exported)
        planned = planned_names()
        self.assertEqual(
            planned & exported, set(), "exported now: not planned any more"
        )
        used: set[str] = set()
        queries = list(dashboard_queries(dashboard))
        for title, description, expr in queries:
            names = metric_names(expr)
            self.assertTrue(names, f"{title}: no metric in {expr!r}")
            unknown = names - exported - planned
            self.assertEqual(unknown, set(), f"{title}: {expr!r}")
            if names & planned:
                # Planned panels say so, and never pass off as real data.
                self.assertIn("planned", title.lower(), title)
                self.assertIn("Planned:", description, title)
            used |= names
        self.assertEqual(planned - used, set(), "planned but on no panel")
        # Request, answer, refusal, error and latency panels are all there.
        for name in (
            "udptime_received_total",
            "udptime_answered_total",
            "udptime_rate_limited_total",
            "udptime_denied_total",
            "udptime_ignored_total",
            "udptime_send_errors_total",
            "udptime_errors_total",
            "udptime_response_seconds_bucket",
            "udptime_clock_synchronised",
            "udptime_kernel_maxerror_seconds",
        ):
            self.assertIn(name, used)

    def test_importable_shape(self) -> None:
        dashboard = json.loads(DASHBOARD.read_text())
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        self.assertLessEqual({"instance", "format", "port", "worker"}, set(variables))
        ids = [panel["id"] for panel in _panels(dashboard["panels"])]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in _panels(dashboard["panels"]):
            if panel["type"] != "row":
                self.assertEqual(panel["datasource"]["uid"], "${datasource}")
                for target in panel["targets"]:
                    self.assertEqual(target["datasource"]["uid"], "${datasource}")
