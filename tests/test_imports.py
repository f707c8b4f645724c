"""Layering: no module of ``bissl`` imports another that imports it back (directly or around a
longer loop), and the config module is a leaf that loads nothing of the compute stack.

Imports are read from the source (module level and inside functions alike), so a cycle hidden in
a lazy import is found too. An edge goes to the module named by the import: ``from bissl.a import
b`` is an edge to ``bissl.a.b`` when that is a module, else to ``bissl.a``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import bissl

ROOT = Path(bissl.__file__).parent
KERNELS = ROOT.parent / "kernels"


def _modules() -> dict[str, Path]:
    found = {}
    for base, prefix in ((ROOT, "bissl"), (KERNELS, "bissl.kernels")):
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    assert len(graph) > 80
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_config_is_a_leaf():
    assert not {m for m in import_graph()["bissl.config"] if m.startswith("bissl.")}
    # Validating a config file loads neither torch nor any compute module.
    code = (
        "import sys; from bissl.config import load_config; load_config(None); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('bissl.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['bissl.config']"
