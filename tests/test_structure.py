"""The package's shape, checked: no import cycle between oodseg modules (function-local imports included), only
``oodseg.platform`` imports Ray, and modules / functions stay within the sizes the style guide sets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oodseg"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported oodseg module, line) for every import statement, resolved to the most specific known module:
    ``from a.b import c`` is ``a.b.c`` when that is a module, else ``a.b``."""
    out = []
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append((full if full in known else base, node.lineno))
    return [(m, line) for m, line in out if m in known]


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: {t for t, _ in imports_of(p, known) if t != m} for m, p in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_oodseg_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["oodseg.platform.benchmark.driver"]  # the scan really sees the package
    assert cycles(graph) == []


def test_cycle_detection_has_teeth():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_platform_layer_imports_ray():
    offenders = []
    for name, path in modules().items():
        if name.startswith("oodseg.platform"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{name}:{node.lineno}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_module_and_function_sizes():
    long_modules = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines()))
                    > MAX_MODULE_LINES}
    long_functions = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.lineno} {node.name} ({n} lines)")
    assert long_modules == {} and long_functions == []


def test_ray_workers_import_only_what_they_run():
    """A read task imports ``oodseg.platform.benchmark.read`` in a fresh worker process: the package must not drag in
    torch (a new worker paid ~7 s on 2 cores for the whole package); the prompter registry must not import
    torchvision's detection stack until a detector is built."""
    code = ("import sys, oodseg.platform.benchmark.read; a = 'torch' in sys.modules; import oodseg.refine; "
            "print(a, 'torchvision.models.detection' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
