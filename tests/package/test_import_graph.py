"""sdelip's modules import each other without a cycle (lazy imports inside functions included)."""

import ast
from pathlib import Path

import sdelip

ROOT = Path(sdelip.__file__).resolve().parent


def modules() -> dict:
    """Module name → (path, is_package) for every .py file of the sdelip package."""
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph() -> dict:
    """Module → the sdelip modules it imports anywhere in its body (ast.walk: functions too)."""
    mods = modules()
    graph = {m: set() for m in mods}
    for m, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = m.split(".") if is_pkg else m.split(".")[:-1]
                if node.level:
                    base = base[: len(base) - (node.level - 1)]
                    pkg = ".".join(base + ([node.module] if node.module else []))
                else:
                    pkg = node.module
                targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in mods else pkg for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t:  # a name inside a module: the module
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_sdelip_modules():
    graph = import_graph()
    assert "sdelip.core.formulas" in graph and graph["sdelip.core.formulas"], "the graph finds no imports"
    assert cycles(graph) == [], "import cycles among sdelip's modules"


def test_the_cycle_check_finds_a_lazy_import_cycle():
    """The check itself: a lazy import inside a function closes a cycle it reports."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    src = "def f():\n    from .b import g\n"
    found = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert [(n.level, n.module) for n in found] == [(1, "b")]


def test_public_errors_are_defined_once_in_sdelip_errors():
    """Every exception and warning class of sdelip is defined in sdelip/errors.py, re-exported by sdelip."""
    import sdelip.errors

    defined = {}
    for name, (path, _) in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef) and (node.name.endswith("Error") or node.name.endswith("Warning")):
                defined.setdefault(node.name, []).append(name)
    assert defined and all(where == ["sdelip.errors"] for where in defined.values()), defined
    assert set(defined) == set(sdelip.errors.__all__)
    for name in sdelip.errors.__all__:
        cls = getattr(sdelip, name)
        assert cls is getattr(sdelip.errors, name) and issubclass(cls, (Exception, Warning)), name
    assert import_graph()["sdelip.errors"] == set(), "sdelip.errors imports nothing of sdelip"
