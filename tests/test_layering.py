"""The layers of docs/design.md hold and imports run one way: no module imports a layer above its own or reaches
itself, lazy imports included.

The import graph is read from the source (every `import` statement, at any depth), so a
function-level import that only runs for some command is caught as well.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# docs/design.md, "Layers", top to bottom; `cli`, `files`, `progress` and `tokenizer` are helpers outside them.
LAYERS = ("scale", "experiment", "analysis", "evaluation", "serve", "data", "train", "checkpoints", "koff", "models",
          "parallel")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports(path: pathlib.Path) -> set[str]:
    """The sparsemem modules `path` imports anywhere in its body (`from pkg import mod` counts as `pkg.mod`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:  # sparsemem uses absolute imports only
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names
                         if _is_module(f"{node.module}.{alias.name}"))
    return {name for name in found if name.split(".")[0] == "sparsemem" and _is_module(name)}


GRAPH = {_module_name(path): _imports(path) for path in (ROOT / "sparsemem").rglob("*.py")}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def _reachable(start: str) -> dict[str, str]:
    """Every module reachable from `start`, each with the module that imports it."""
    parent, todo = {start: ""}, [start]
    while todo:
        module = todo.pop()
        for target in GRAPH.get(module, ()):
            if target not in parent:
                parent[target] = module
                todo.append(target)
    return parent


def test_the_graph_sees_function_level_imports():
    assert "sparsemem.experiment.run" in GRAPH["sparsemem.experiment.commands"]  # imported inside `_run` only
    assert "sparsemem.serve.deploy" in GRAPH["sparsemem.serve.commands"]


def test_layers_import_only_layers_below_them():
    upward = [f"{module} imports {target}" for module, targets in sorted(GRAPH.items()) for target in sorted(targets)
              if _layer(module) and _layer(target)
              and LAYERS.index(_layer(target)) < LAYERS.index(_layer(module))]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("forbidden", ["sparsemem.experiment", "sparsemem.train"])
def test_serving_never_reaches_the_experiment_runner_or_training(forbidden):
    chains = []
    for module in sorted(m for m in GRAPH if m.startswith("sparsemem.serve.")):
        parent = _reachable(module)
        for target in sorted(t for t in parent if t.startswith(forbidden + ".")):
            chain = [target]
            while parent[chain[-1]]:
                chain.append(parent[chain[-1]])
            chains.append(" <- ".join(chain))
    assert not chains, f"serving reaches {forbidden}:\n" + "\n".join(chains[:10])


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` (depth-first search; a module met again on the current path closes it), or []."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target, path + [target])):
                return found
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return []


def test_the_cycle_finder_finds_a_cycle_and_only_a_cycle():
    assert _cycle({"d": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_imports_run_one_way():
    """No module reaches itself through imports (function-level ones included): every package reads bottom-up."""
    cycle = _cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)
