"""The product's import graph, parsed from the source: no cycles, and no product module imports dev tooling.

Every import counts, inside functions and under TYPE_CHECKING too: a cycle there is still a tangle a reader
has to hold in mind. Importing a.b.c also imports the packages a and a.b, so those count as well.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = {"zstack_node": REPO / "node", "zstack_operator": REPO / "operator", "zstack_cli": REPO / "cli",
           "zstack_kube": REPO / "kube"}
DEV_ONLY = ("zstack_devcluster", "zstack_bench", "tests")


def product_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the product packages."""
    modules = {}
    for package, root in PRODUCT.items():
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported_names(module: str, path: Path) -> Iterator[str]:
    """Every module name `module` imports, absolute (`from . import x` resolved against its package)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the product modules it imports, with the packages each import passes through."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in imported_names(module, path):
            parts = name.split(".")
            targets |= {".".join(parts[:n]) for n in range(1, len(parts) + 1)} & modules.keys()
        graph[module] = targets - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that returns to its start, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = "open", stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return [*stack[stack.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = "done", stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_relative_imports_and_parent_packages() -> None:
    graph = edges(product_modules())
    assert "zstack_node.bus.cloudbus" in graph["zstack_node.node"]
    assert {"zstack_node.cloud", "zstack_node.cloud.settings"} <= graph["zstack_node.config"]


def test_no_import_cycle_among_product_modules() -> None:
    cycle = find_cycle(edges(product_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("module", sorted(product_modules()))
def test_product_code_never_imports_dev_tooling(module: str) -> None:
    names = set(imported_names(module, product_modules()[module]))
    dev = sorted(n for n in names if n.split(".")[0] in DEV_ONLY)
    assert not dev, f"{module} imports dev-only {dev}: devcluster, bench and tests are never in the product"
