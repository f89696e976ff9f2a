"""The import structure of cnnbatch/, read from the source with ``ast`` (imports inside functions included):
no cycles, the CLI imported only by entrypoints, and no job module imported from below the job layer."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cnnbatch"
ENTRYPOINTS = {"__main__", "cli", "demo"}  # what a user runs; they may import anything
JOBS = {"extract", "train", "predict", "plan", "finetune"}  # one module per job: config + runner


def module_imports() -> dict[str, set[str]]:
    """Each cnnbatch module -> the cnnbatch modules it imports (``from . import x``, ``from .x import y``,
    ``import cnnbatch.x``), anywhere in the file."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 1 or base.startswith("cnnbatch"):
                    name = base.removeprefix("cnnbatch").lstrip(".").split(".")[0]
                    if name:
                        found.add(name)
                    else:  # from . import storage, ...
                        found.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.Import):
                found.update(alias.name.split(".")[1] for alias in node.names
                             if alias.name.startswith("cnnbatch.") and alias.name.split(".")[1] in modules)
        graph[path.stem] = found & modules - {path.stem}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_reader_finds_imports_and_cycles() -> None:
    graph = module_imports()
    assert {"storage", "config"} <= graph["extract"] and "worker" in graph["pool"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_cnnbatch() -> None:
    assert find_cycle(module_imports()) is None


def test_cli_is_imported_by_entrypoints_only() -> None:
    importers = {module for module, targets in module_imports().items() if "cli" in targets}
    assert importers <= ENTRYPOINTS, importers - ENTRYPOINTS


def test_no_job_module_is_imported_from_below_the_job_layer() -> None:
    offenders = {(module, target) for module, targets in module_imports().items()
                 if module not in ENTRYPOINTS for target in targets & JOBS if module != target}
    assert not offenders, f"modules importing a job module (jobs import shared machinery, not each other): {offenders}"
