"""Structure of ``mtseg_harness``: no import cycles, layers that run one way, imports at the
top of modules, and a ``mtseg`` that names a missing ``[harness]`` package in one line.

The import graph is read from the source (``ast``), every import counted, including those
inside functions, so a cycle cannot hide behind a function-level import.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = REPO / "harness"
PACKAGE = "mtseg_harness"

# cli -> runs -> training -> {methods, models, data, evaluation}; config is read by all.
# Within the lowest layer: methods use model heads and data wrappers, evaluation reads
# the data's declared extras; models and data use nothing of the harness.
ALLOWED = {
    "cli": {"runs", "config"},
    "runs": {"training", "methods", "models", "data", "evaluation", "config"},
    "training": {"methods", "data", "evaluation", "config"},
    "methods": {"models", "data"},
    "evaluation": {"data"},
    "models": set(),
    "data": set(),
    "config": set(),
    "assets": {"data"},
}

# The only imports allowed inside functions: the harness itself once in the CLI (after it
# checked that the [harness] extra is installed), and optional or heavy third-party
# packages that only some commands need.
FUNCTION_LEVEL = {
    ("cli", f"{PACKAGE}.runs"),
    ("cli", f"{PACKAGE}.config"),
    ("evaluation.report", "matplotlib"),
    ("evaluation.report", "matplotlib.pyplot"),
    ("training.logs", "torch.utils.tensorboard"),
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(HARNESS).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE] + parts)


def _imports(path: Path):
    """``(target module, inside a function)`` for every import of ``path``, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # ``from . import runs`` imports the submodule ``runs``
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub if _is_module(sub) else mod), id(node) in in_function


def _is_module(name: str) -> bool:
    if not name.startswith(PACKAGE + ".") and name != PACKAGE:
        return False
    rel = Path(*name.split(".")[1:]) if name != PACKAGE else Path()
    return (HARNESS / rel).with_suffix(".py").is_file() or (HARNESS / rel / "__init__.py").is_file()


def _graph():
    graph, function_level = {}, []
    for path in sorted(HARNESS.rglob("*.py")):
        name = _module_name(path)
        edges = set()
        for target, in_fn in _imports(path):
            if in_fn:
                function_level.append((name, target))
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                # resolve to the longest existing module prefix
                while not _is_module(target):
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    edges.add(target)
        graph[name] = edges
    return graph, function_level


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_there_is_no_import_cycle():
    graph, _ = _graph()
    assert len(graph) > 40  # the whole package was read
    cycles = _cycles(graph)
    assert cycles == [], f"import cycles: {cycles}"


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layers_run_one_way():
    graph, _ = _graph()
    wrong = []
    for module, targets in graph.items():
        src = _layer(module)
        for t in targets:
            dst = _layer(t)
            if dst != src and dst not in ALLOWED.get(src, set()):
                wrong.append(f"{module} -> {t}")
    assert wrong == [], "imports against the layers (cli -> runs -> training -> methods/models/data/evaluation):\n" + \
        "\n".join(wrong)


def test_imports_inside_functions_only_for_a_reason():
    _, function_level = _graph()
    found = {(m[len(PACKAGE) + 1:], t) for m, t in function_level}
    assert found <= FUNCTION_LEVEL, f"imports inside functions: {sorted(found - FUNCTION_LEVEL)}"


@pytest.mark.parametrize("module,package", [("yaml", "pyyaml"), ("scipy", "scipy"), ("pandas", "pandas")])
def test_mtseg_without_a_harness_package_says_which_extra_in_one_line(module, package):
    """A missing package of the [harness] extra (simulated: None in sys.modules) -> one line, exit 1."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules[{module!r}] = None  # what `import {module}` sees when it is not installed
        from mtseg_harness.cli import main
        sys.exit(main(["train", "--set", "train.steps=1"]))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 1
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"needs {package} (the [harness] extra)" in lines[0] and "pip install" in lines[0] and "[harness]" in lines[0]
    assert "Traceback" not in out.stderr
