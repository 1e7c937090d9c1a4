"""What this udptime accepts, as JSON, for tools that must not scrape ``--help``.

``python -m udptime.describe`` prints the options (``--name`` -> whether it
takes a value, its default and help) and the formats; the benchmark asks it
which rows the installed udptime can run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from udptime import __version__
from udptime.registry import format_names
from udptime.tap import Options


def describe() -> dict[str, Any]:
    """The options (``--name`` -> what it takes) and formats this udptime serves."""
    options = Options()
    short = {long: key for key, long in options.synonyms.items() if len(key) == 1}
    described: dict[str, Any] = {}
    for entry in options.longOpt:
        name = entry.rstrip("=")
        value = entry.endswith("=")
        default = options.defaults.get(name) if value else None
        described[f"--{name}"] = {
            "short": f"-{short[name]}" if name in short else None,
            "value": value,
            "default": None if default is None else str(default),
            "help": options.docs.get(name, ""),
        }
    return {
        "version": __version__,
        "formats": format_names(),
        "options": described,
    }


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        prog="python -m udptime.describe",
        description="Print the options and formats this udptime accepts, as JSON.",
    ).parse_args(argv)
    print(json.dumps(describe(), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
