"""Layers point down: the library (kvjax, models, pallas_kernels) never imports the harness (eval), and the eval
package's modules import each other without cycles. Read from the source with ``ast`` (imports inside functions
count too), so a cycle dodged by a function-level import is caught as well."""
import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from .x import y`` resolved; ``from pkg import name``
    gives both ``pkg`` and ``pkg.name``, since ``name`` may be a submodule)."""
    mod = _module_name(path)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module
            out.add(src)
            out |= {f"{src}.{a.name}" for a in node.names}
    return out


def _sources(top: str) -> list[pathlib.Path]:
    return sorted((REPO / top).rglob("*.py"))


@pytest.mark.parametrize("top", ["kvjax", "models", "pallas_kernels"])
def test_library_never_imports_the_harness(top):
    bad = {str(p.relative_to(REPO)): sorted(m for m in _imports(p) if m == "eval" or m.startswith("eval."))
           for p in _sources(top)}
    assert not {k: v for k, v in bad.items() if v}


def test_eval_modules_have_no_import_cycle():
    mods = {_module_name(p): p for p in _sources("eval")}
    graph = {m: {d for d in _imports(p) if d in mods and d != m} for m, p in mods.items()}
    # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
    graph = {m: {d for d in ds if not (m == d.rpartition(".")[0] and mods[m].name == "__init__.py")}
             for m, ds in graph.items()}
    assert {"eval.cli", "eval.runner", "eval.store", "eval.grid", "eval.presets", "eval.stats", "eval.summary",
            "eval.compare", "eval.benchmarks.toy"} <= set(graph)
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles
