"""The shape docs/architecture.md promises, read from the code's imports."""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.trial import unittest

PACKAGE = Path(__file__).resolve().parent.parent / "udptime"

#: The datagram path: it must not know any format or protocol.
DATAGRAM_PATH = ("udptime.core", "udptime.protocol", "udptime.mmsg")
FORMAT_MODULES = (
    "udptime.formats",
    "udptime.ntp",
    "udptime.nts",
    "udptime.roughtime",
    "udptime.responders",
    "udptime.registry",
)
#: Wire modules: pure, no Twisted, no clock state.
WIRE = (
    "udptime.formats",
    "udptime.ntp",
    "udptime.nts.records",
    "udptime.nts.extensions",
    "udptime.nts.cookies",
    "udptime.roughtime.wire",
    "udptime.roughtime.merkle",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Every module's imports, function-level ones included (a lazy import
    still ties two modules together)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = found
    modules = set(graph)
    return {
        name: {dep for dep in deps if dep in modules and dep != name}
        for name, deps in graph.items()
    }


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class ArchitectureTests(unittest.TestCase):
    def test_no_import_cycle(self) -> None:
        graph = imports()
        # A package's __init__ importing nothing, a module importing its
        # package is not a cycle worth the name: drop module -> own package.
        for name, deps in graph.items():
            deps.difference_update(d for d in list(deps) if name.startswith(d + "."))
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(name: str) -> None:
            state[name] = 1
            stack.append(name)
            for dep in sorted(graph[name]):
                if state.get(dep) == 1:
                    cycle = stack[stack.index(dep) :] + [dep]
                    self.fail("import cycle: " + " -> ".join(cycle))
                if dep not in state:
                    visit(dep)
            stack.pop()
            state[name] = 2

        for name in sorted(graph):
            if name not in state:
                visit(name)

    def test_datagram_path_knows_no_format(self) -> None:
        graph = imports()
        for name, deps in graph.items():
            if under(name, DATAGRAM_PATH):
                wrong = sorted(d for d in deps if under(d, FORMAT_MODULES))
                self.assertEqual(wrong, [], name)

    def test_wire_modules_are_pure(self) -> None:
        for path in PACKAGE.rglob("*.py"):
            name = module_name(path)
            if name not in WIRE:
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for imported in names:
                    self.assertFalse(imported.startswith("twisted"), name)
                    self.assertNotIn("clockstate", imported, name)
                    self.assertNotIn("registry", imported, name)
