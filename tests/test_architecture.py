"""The package's layout rules (docs/architecture.md), checked from the source text.

- no module of ``src/lipmargin`` is longer than 500 lines;
- no import cycle between lipmargin modules, imports inside functions included (``if TYPE_CHECKING:``
  imports are not executed and do not count);
- every import between two packages goes in the direction drawn in docs/architecture.md;
- every name in a module's ``__all__`` resolves.

The checker is tested on small synthetic trees first, so that a rule that can no longer fail is seen.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_LINES = 500


# --------------------------------------------------------------------------------------------
# The checker: pure functions of a source tree
# --------------------------------------------------------------------------------------------


def module_files(src: Path, package: str = "lipmargin") -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``src``."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skip.update(id(n) for n in ast.walk(inner))
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The lipmargin modules ``name`` imports (at any depth of its code), with line numbers.

    ``from a.b import c`` counts as an import of ``a.b.c`` when that is a module, else of ``a.b``.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    root = name.split(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                found.append((candidate if candidate in modules else module, node.lineno))
    return [(target, line) for target, line in found if target.split(".")[0] == root and target in modules]


def import_graph(modules: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (each reported once, by its set of nodes)."""
    cycles: list[list[str]] = []
    seen_sets: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(node: str, stack: list[str], on_stack: set[str]) -> None:
        for target, _ in graph.get(node, ()):
            if target == node:
                continue
            if target in on_stack:
                cycle = stack[stack.index(target):] + [target]
                key = frozenset(cycle)
                if key not in seen_sets:
                    seen_sets.add(key)
                    cycles.append(cycle)
            elif target not in done:
                stack.append(target)
                on_stack.add(target)
                visit(target, stack, on_stack)
                on_stack.discard(target)
                stack.pop()
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start], {start})
    return cycles


def long_modules(modules: dict[str, Path], limit: int = MAX_LINES) -> list[tuple[str, int]]:
    counts = [(name, len(path.read_text().splitlines())) for name, path in modules.items()]
    return [(name, n) for name, n in counts if n > limit]


def read_layers(text: str) -> dict[str, int]:
    """The import direction from docs/architecture.md: the ```text block after the line
    'import direction'; one level per line, lowest first; names on one line are one level."""
    match = re.search(r"import direction.*?```text\n(.*?)```", text, re.S | re.I)
    if match is None:
        raise ValueError("docs/architecture.md has no ```text block after 'import direction'")
    levels: dict[str, int] = {}
    for level, line in enumerate(l for l in match.group(1).splitlines() if l.strip() and not l.startswith("#")):
        for unit in line.split():
            levels[unit] = level
    return levels


def unit_of(module: str) -> str:
    """The layout unit of a module: its first sub-package or top-level module (``lipmargin.data.idx``
    -> ``data``); the package's own ``__init__`` is ``lipmargin``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def direction_violations(graph: dict[str, list[tuple[str, int]]], levels: dict[str, int]) -> list[str]:
    out = []
    for module, targets in graph.items():
        unit = unit_of(module)
        for target, line in targets:
            other = unit_of(target)
            if other == unit:
                continue
            if unit not in levels or other not in levels:
                missing = unit if unit not in levels else other
                out.append(f"{module}:{line} imports {target}: '{missing}' is not placed in docs/architecture.md")
            elif levels[other] >= levels[unit]:
                out.append(f"{module}:{line} imports {target} (level {levels[other]} >= {unit}'s {levels[unit]})")
    return out


# --------------------------------------------------------------------------------------------
# The checker can fail: synthetic trees
# --------------------------------------------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return module_files(tmp_path, "pkg")


def test_checker_finds_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "from pkg.b import f\n",
        "b.py": "def f():\n    from pkg import a  # inside a function: still a cycle\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import f\n",
    })
    cycles = find_cycles(import_graph(modules))
    assert [sorted(set(c)) for c in cycles] == [["pkg.a", "pkg.b"]]


def test_checker_resolves_relative_imports_and_subpackages(tmp_path: Path) -> None:
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "sub/__init__.py": "from .x import g\n",
        "sub/x.py": "from ..y import h\n",
        "y.py": "from pkg.sub import x\n",
    })
    graph = import_graph(modules)
    assert graph["pkg.sub"] == [("pkg.sub.x", 1)]
    assert graph["pkg.sub.x"] == [("pkg.y", 1)]
    assert [sorted(set(c)) for c in find_cycles(graph)] == [["pkg.sub.x", "pkg.y"]]


def test_checker_finds_a_501_line_module_and_an_upward_import(tmp_path: Path) -> None:
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "low.py": "from pkg.high import thing\n" + "x = 1\n" * 499,  # 500 lines: allowed
        "high.py": "thing = 1\n" * 501,
    })
    assert long_modules(modules) == [("pkg.high", 501)]
    levels = read_layers("## Import direction\n```text\nlow\nhigh\n```\n")
    assert levels == {"low": 0, "high": 1}
    assert direction_violations(import_graph(modules), levels) == [
        "pkg.low:1 imports pkg.high (level 1 >= low's 0)"
    ]


# --------------------------------------------------------------------------------------------
# The rules, on lipmargin itself
# --------------------------------------------------------------------------------------------

MODULES = module_files(SRC)
GRAPH = import_graph(MODULES)


def test_no_module_is_longer_than_500_lines() -> None:
    assert long_modules(MODULES) == [], "split these modules (docs/architecture.md says where things go)"


def test_no_import_cycle_between_lipmargin_modules() -> None:
    assert find_cycles(GRAPH) == []


def test_imports_follow_the_direction_in_docs_architecture() -> None:
    levels = read_layers(ARCHITECTURE.read_text())
    assert set(levels) >= {unit_of(m) for m in MODULES}, "every package and top-level module is placed"
    assert direction_violations(GRAPH, levels) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_name_in_all_resolves(module: str) -> None:
    if "__all__" not in MODULES[module].read_text():
        return
    imported = importlib.import_module(module)
    missing = [name for name in getattr(imported, "__all__", ()) if not hasattr(imported, name)]
    assert missing == []
