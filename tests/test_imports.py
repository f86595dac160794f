"""The package's import graph has no cycle: every `metarl` import, at module level or inside a
function, is an edge; a cycle (what function-local imports used to hide) fails with its path."""

from __future__ import annotations

import ast
from pathlib import Path

import metarl

PACKAGE = Path(metarl.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "metarl.distributed.run" in graph["metarl.cli"] and "metarl.cliargs" in graph["metarl.experiments.evaluate"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


LAYERS = {"core": 0, "tasks": 0, "distributed": 1, "cliargs": 2, "experiments": 3, "interop": 3, "tools": 4, "cli": 5,
          "__main__": 5}
"""The package's layers, lowest first: the mathematics and the environments, the distributed run,
the commands' shared flags, the experiments and the RLlib interop, the benchmarks, the command
line. A module may import its own layer or lower ones, never a higher one."""


def layer(module: str) -> str:
    parts = module.split(".")
    return "package" if len(parts) == 1 else parts[1]


def test_every_module_sits_in_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    for name in graph:
        assert layer(name) in LAYERS or layer(name) == "package", f"{name} is in no layer (folders: {sorted(LAYERS)})"
    upward = [f"{m} ({layer(m)}) imports {n} ({layer(n)})" for m, targets in graph.items() for n in targets
              if layer(m) in LAYERS and layer(n) in LAYERS and LAYERS[layer(n)] > LAYERS[layer(m)]]
    assert upward == [], "\n".join(upward)
    assert {layer(m) for m in graph} >= {"core", "distributed", "experiments", "tools", "interop"}
