"""Data flows one way: no import cycle between the package's modules, counting imports inside functions
too (a lazy import still ties two modules together)."""

from __future__ import annotations

import ast

from conftest import ROOT


def _imports(path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("infoprompt_ds."):
            out.add(node.module.split(".")[1])
    return out


def test_no_import_cycle():
    pkg = ROOT / "infoprompt_ds"
    graph = {p.stem: _imports(p) for p in pkg.glob("*.py") if p.stem != "__init__"}
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph.get(mod, ())):
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [mod, dep])
            if dep not in state:
                visit(dep, path + [mod])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [])
