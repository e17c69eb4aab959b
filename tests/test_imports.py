"""No import cycle among the packages: every module imports alone in a fresh interpreter, and the graph of every
project import (those inside functions included, which hide cycles from the first check) has no cycle. The layers
point one way: analysis (the law) never imports tuning (the sweep), which uses it."""
import ast
import json
import subprocess
import sys
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


# Run in one fresh interpreter: import every third-party package the project imports, then fork a child per project
# module that imports it alone. The children share the parent's torch, Ray, DeepSpeed ... (the 1-2 s each fresh
# interpreter spent on them, 50 s of CPU in all on 2 cores), while no project module is loaded before the child's own.
ALONE = """
import importlib, json, os, sys, traceback
for package in json.loads(sys.argv[1]):
    try:
        importlib.import_module(package)
    except Exception:
        pass  # not a module (a name imported from one), or an extra not installed: the child that needs it fails
assert not [m for m in sys.modules if m.split(".")[0] in json.loads(sys.argv[2])], "a project module was preloaded"
for name in json.loads(sys.argv[3]):
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(name)
        except BaseException:
            print("FAILED ALONE " + json.dumps([name, traceback.format_exc().strip().splitlines()[-1]]), flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status and os.waitstatus_to_exitcode(status) != 1:
        print("FAILED ALONE " + json.dumps([name, f"exit status {os.waitstatus_to_exitcode(status)}"]), flush=True)
"""


def _failed_alone(stdout: str) -> list[list[str]]:
    """[module, last line of its error] for every child of ALONE that failed."""
    marker = "FAILED ALONE "
    return [json.loads(line[len(marker):]) for line in stdout.splitlines() if line.startswith(marker)]


def _third_party() -> list[str]:
    """Every third-party module the project imports (submodules named by `from X import Y` included)."""
    found = set()
    for path in MODULES.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
    ours_or_std = set(PACKAGES) | set(sys.stdlib_module_names)
    return sorted(name for name in found if name.split(".")[0] not in ours_or_std)


@pytest.mark.slow  # ~100 forked children of one interpreter: a house check CI runs
def test_every_module_imports_alone_in_a_fresh_interpreter():
    # One child per module: a cycle at import time shows only when its module is the first project module imported.
    proc = subprocess.run([sys.executable, "-c", ALONE, json.dumps(_third_party()), json.dumps(PACKAGES),
                           json.dumps(sorted(MODULES))], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = [": ".join(failed) for failed in _failed_alone(proc.stdout)]
    assert not failures, "\n".join(failures)


def test_a_module_that_fails_alone_is_named(tmp_path):
    """The check itself: a module importing its package's other module in a cycle fails alone, and is named."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from cyc.b import B\nA = 1\n")
    (pkg / "b.py").write_text("from cyc.a import A\nB = 2\n")
    proc = subprocess.run([sys.executable, "-c", ALONE, json.dumps(["torch"]), json.dumps(["cyc"]),
                           json.dumps(["cyc", "cyc.a", "cyc.b"])], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    failed = _failed_alone(proc.stdout)
    assert [name for name, _ in failed] == ["cyc.a", "cyc.b"] and all("partially initialized" in e for _, e in failed)
