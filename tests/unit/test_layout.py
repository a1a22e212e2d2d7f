"""The package's shape shows its architecture (issue: layout v2): a folder per concept, few modules at the
top, small modules and functions, and data flowing one way: no import cycle between modules nor between
subpackages, counting imports inside functions too (a lazy import still ties two modules together)."""

from __future__ import annotations

import ast

from conftest import ROOT

PKG = ROOT / "infoprompt_ds"


def _module(path) -> str:
    return ".".join(path.relative_to(PKG).with_suffix("").parts)


def _imports(path) -> set[str]:
    """The package modules this file imports ("runtime.setup", "config"), relative imports resolved."""
    here = _module(path).split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[:len(here) - node.level + 1] + (node.module.split(".") if node.module else [])
        elif (node.module or "") == "infoprompt_ds" or (node.module or "").startswith("infoprompt_ds."):
            base = node.module.split(".")[1:]
        else:
            continue
        for a in node.names:  # `from pkg import module` imports the module; `from module import name` the module
            sub = ".".join(base + [a.name])
            out.add(sub if (PKG / sub.replace(".", "/")).with_suffix(".py").exists() else ".".join(base))
    return {m for m in out if m}


def _modules():
    return [p for p in PKG.rglob("*.py") if p.stem not in ("__init__", "__main__")]


def _find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state:
                found = visit(dep, path + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def test_no_import_cycle_between_modules():
    graph = {_module(p): _imports(p) - {_module(p)} for p in _modules()}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_between_subpackages():
    """The top-level modules (config, errors, io...) are shared by all; between the subpackages data flows one
    way: data -> method -> runtime, tracking -> runtime, compare reads tracking."""
    subs = {p.name for p in PKG.iterdir() if (p / "__init__.py").exists()}
    graph: dict[str, set[str]] = {}
    for p in _modules():
        mod = _module(p)
        if "." not in mod:
            continue
        src = mod.split(".")[0]
        deps = {d.split(".")[0] for d in _imports(p)} & subs
        graph.setdefault(src, set()).update(deps - {src})
    cycle = _find_cycle(graph)
    assert cycle is None, "subpackage import cycle: " + " -> ".join(cycle)


def test_package_shape():
    top = [p.stem for p in PKG.glob("*.py") if p.stem != "__init__"]
    subs = [p.name for p in PKG.iterdir() if (p / "__init__.py").exists()]
    assert len(top) <= 12, f"{len(top)} top-level modules (at most 12): {sorted(top)}"
    assert len(subs) >= 4, f"subpackages: {subs}"
    for s in subs:  # each subpackage names its public functions in its docstring
        assert ast.get_docstring(ast.parse((PKG / s / "__init__.py").read_text())), f"{s}/__init__.py: no docstring"


def test_modules_and_functions_stay_small():
    long_modules = {_module(p): n for p in _modules() if (n := len(p.read_text().splitlines())) > 450}
    assert not long_modules, f"modules over 450 lines: {long_modules}"
    long_functions = []
    for p in _modules():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{_module(p)}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_functions, f"functions over 80 lines: {long_functions}"
