"""The package's import graph: no cycles, and no import running back up the layers.

Every import in ``stylex/`` is read from the source (function-level ones included), so an import
that only runs in a rarely taken branch counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stylex"

# What each part of the package may import (besides itself and the leaves below everything).
LEAVES = {"stylex.errors", "stylex.utils", "stylex.resources"}
LAYERS = {
    "stylex": set(),  # the package's __init__
    "stylex.errors": set(),
    "stylex.utils": set(),
    "stylex.ops": set(),
    "stylex.networks": {"stylex.ops"},
    "stylex.stylespace": {"stylex.networks"},
    "stylex.data": set(),
    "stylex.classifier": set(),
    "stylex.export": {"stylex.networks", "stylex.classifier"},
    "stylex.metrics": {"stylex.classifier", "stylex.data", "stylex.networks"},
    "stylex.explain": {"stylex.stylespace", "stylex.networks", "stylex.classifier", "stylex.data", "stylex.export",
                       "stylex.metrics"},
    "stylex.training": {"stylex.ops", "stylex.networks", "stylex.classifier", "stylex.data", "stylex.export",
                        "stylex.stylespace", "stylex.config", "stylex.metrics"},
    "stylex.dissect": {"stylex.stylespace", "stylex.networks", "stylex.classifier", "stylex.data", "stylex.export",
                       "stylex.metrics", "stylex.explain"},
    "stylex.config": {"stylex.training", "stylex.classifier", "stylex.explain", "stylex.dissect"},
    "stylex.resources": set(),  # where the shipped configs and CUDA sources are
    "stylex.cli": {"stylex.training", "stylex.config", "stylex.explain", "stylex.dissect"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The stylex modules ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from stylex.x import y` imports the module stylex.x.y when y is one
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def test_the_graph_was_read():
    # Known edges, module-level and function-level: the reader must find both kinds.
    assert {"stylex.ops.bias_act", "stylex.ops.upfirdn2d"} <= GRAPH["stylex.networks.layers"]
    assert "stylex.training.run" in GRAPH["stylex.cli"]  # imported inside a function


def test_no_import_cycles():
    # Depth-first search for a back edge. A module importing from its own package's __init__
    # while that __init__ imports the module is a cycle too: it only works by import order.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    part = _part(name)
    if part not in LAYERS:
        pytest.fail(f"{part} is not in the layer table of this test; add it with what it may import")
    allowed = LAYERS[part] | {part} | LEAVES
    wrong = sorted(m for m in GRAPH[name] if _part(m) not in allowed)
    assert not wrong, f"{name} imports {wrong}, which {part} may not depend on"


def test_a_planted_cycle_is_found():
    # The cycle search above must notice a cycle when one exists.
    saved = dict(GRAPH)
    try:
        GRAPH["stylex.ops.dispatch"] = GRAPH["stylex.ops.dispatch"] | {"stylex.ops.upfirdn2d"}
        GRAPH["stylex.ops.upfirdn2d"] = GRAPH["stylex.ops.upfirdn2d"] | {"stylex.ops.dispatch"}
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        GRAPH.clear()
        GRAPH.update(saved)
