"""The code's layout: no import circle among the project's modules (function-level imports
counted) and no private name imported across modules; a parameter followed from a task down
into the library never climbs back up."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("finance_qlora", "tasks", "flows")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}" if path.stem != "__init__" else package
            found[name] = path
    return found


def imports(path: Path, known: set[str]) -> list[tuple[str, str]]:
    """(module, name) for every import of a project module in `path`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in known:  # `from finance_qlora import errors`
                    found.append((sub, ""))
                elif node.module in known:
                    found.append((node.module, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name in known]
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m, _ in imports(path, set(known)) if m != name} for name, path in known.items()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle_among_the_projects_modules():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_private_name_is_imported_across_modules():
    known = modules()
    private = [
        f"{name} imports {module}.{item}"
        for name, path in known.items()
        for module, item in imports(path, set(known))
        if item.startswith("_") and module != name
    ]
    assert private == []
