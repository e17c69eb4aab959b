"""No import cycle among the packages: every module imports alone in a fresh interpreter, and the graph of every
project import (those inside functions included, which hide cycles from the first check) has no cycle. The layers
point one way: analysis (the law) never imports tuning (the sweep), which uses it."""
import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "training", "tuning", "analysis")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, (ast.Name, ast.Attribute)) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _imports(name: str, path: Path) -> set[str]:
    """Project modules `name` imports anywhere (module level or in functions), TYPE_CHECKING blocks excepted."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            targets = []
        # A module's own ancestor packages are initialised before it runs: importing them is no edge.
        found.update(t for t in targets if t in MODULES and t != name and not name.startswith(t + "."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def test_the_import_graph_has_no_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                walk(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node)


def test_the_analysis_layer_never_imports_tuning():
    offenders = {name: sorted(t for t in _imports(name, path) if t == "tuning" or t.startswith("tuning."))
                 for name, path in MODULES.items() if name == "analysis" or name.startswith("analysis.")}
    assert len(offenders) > 5  # the check sees the package
    assert not {name: found for name, found in offenders.items() if found}


def _import_alone(name: str) -> str | None:
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT)
    return None if proc.returncode == 0 else f"{name}: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"


@pytest.mark.slow  # ~100 fresh interpreters (50 s of the quick loop's 3 min on 2 cores): a house check CI runs
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # One interpreter per module: a cycle at import time shows only when its module is the first one imported.
    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [f for f in pool.map(_import_alone, MODULES) if f]
    assert not failures, "\n".join(failures)
