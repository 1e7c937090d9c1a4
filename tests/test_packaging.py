"""A real ``pip install .`` into a fresh virtual environment finds the plugin."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

import udptime
from tests.support import REPO

DISCOVER = """
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
names = sorted(p.tapname for p in getPlugins(IServiceMaker))
print("udptime" in names)
"""


class PipInstallTests(unittest.TestCase):
    def test_installed_plugin_is_discovered(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="udptime-pip-"))
        self.addCleanup(shutil.rmtree, root, True)
        # Install from a copy holding only tracked-looking sources, so a
        # developer's build/ or dropin.cache cannot leak into the result.
        source = root / "src"
        shutil.copytree(
            REPO,
            source,
            ignore=shutil.ignore_patterns(
                ".git",
                ".venv",
                "build",
                "*.egg-info",
                "__pycache__",
                "dropin.cache",
                "_trial_temp*",
            ),
        )
        venv = root / "venv"
        subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=True, timeout=120
        )
        python = venv / "bin" / "python"
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", str(source)],
            check=True,
            timeout=600,
        )
        # Run from an unrelated directory: only the installed copy can answer.
        done = subprocess.run(
            [str(python), "-c", DISCOVER],
            capture_output=True,
            check=False,
            cwd=str(root),
            timeout=120,
        )
        self.assertEqual(done.stdout.strip(), b"True", done.stderr)
        helped = subprocess.run(
            [str(venv / "bin" / "twistd"), "--help"],
            capture_output=True,
            check=False,
            cwd=str(root),
            timeout=120,
        )
        self.assertIn(b"udptime", helped.stdout)
        self.assertTrue(
            list(
                (venv / "lib").glob(
                    "python3*/site-packages/twisted/plugins/udptime_plugin.py"
                )
            )
        )
        # The console script, and the licence travels with the metadata.
        version = subprocess.run(
            [str(venv / "bin" / "udptime"), "--version"],
            capture_output=True,
            check=False,
            cwd=str(root),
            timeout=120,
            text=True,
        )
        self.assertEqual(version.stdout, f"udptime {udptime.__version__}\n")
        licences = list(
            (venv / "lib").glob("python3*/site-packages/udptime-*.dist-info/**/LICENSE")
        )
        self.assertEqual(len(licences), 1)
        self.assertIn("MIT License", licences[0].read_text())
