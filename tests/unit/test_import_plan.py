"""The house plan: which parts of ``oppu`` may import which (docs/internals.md draws it).

Every module under ``oppu/`` is parsed (not imported) and each of its imports of another part
counts: top-level, inside functions, under ``TYPE_CHECKING``, and the module names that
``importlib.import_module`` is handed as text (the command map, the lazy exports). A part may
import only parts of a lower layer, so the parts form no loop; a test below shows the check
failing for an import that breaks the plan.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

OPPU = Path(__file__).resolve().parents[2] / "oppu"

# Bottom to top. A part is a subpackage or a top-level module of oppu; ``oppu`` is the package's
# own __init__, and ``cli`` (the map of command names) belongs with ``commands``.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("logs",),  # the oppu logger and progress (the package's __init__ configures it in Ray workers)
    ("oppu", "errors"),
    ("ids", "config", "fsutil"),
    ("metrics",),  # LaMP's arithmetic
    ("tasks",),  # the task registry (scores through metrics)
    ("data", "models", "store"),
    ("retrieval", "profiles", "run_config", "actor_pools", "erasure"),
    ("user_history",),  # a user's history items in (oppu users add, PUT .../history)
    ("training", "evaluation", "serving"),  # siblings: none imports another
    ("user_adapters",),  # a user's adapter versions: list, rollback, export, import (checked as serving would)
    ("preflight",),
    ("pipeline",),  # runs the training and evaluation stages
    # one user's history in and their adapters trained; a base upgrade's migration (both run the users stage)
    ("onboarding", "migration"),
    ("analysis",),  # runs stages and trains adapters for the paper's analyses
    ("commands",),  # and cli
)
ALIASES = {"cli": "commands"}
LAYER_OF = {part: level for level, parts in enumerate(LAYERS) for part in parts}

_MODULE_TEXT = re.compile(r"oppu(\.[A-Za-z_][A-Za-z0-9_]*)+")


def part_of(module: str) -> str:
    """The plan's part that the dotted ``module`` (``oppu.tasks.lamp``, ``oppu.cli``) belongs to."""
    names = module.split(".")
    part = names[1] if len(names) > 1 else "oppu"
    return ALIASES.get(part, part)


def module_name(path: Path) -> str:
    names = path.relative_to(OPPU.parent).with_suffix("").parts
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[str, int]]:
    """Every ``oppu`` module that ``source`` (the text of ``module``) imports, with its line."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from oppu import fsutil`` imports the module oppu.fsutil
            found += [(f"{base}.{alias.name}" if base == "oppu" else base, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_TEXT.fullmatch(node.value):
            if _module_exists(node.value):
                found.append((node.value, node.lineno))
    return [(name, line) for name, line in found if name == "oppu" or name.startswith("oppu.")]


def _module_exists(module: str) -> bool:
    path = OPPU.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def part_imports(sources: dict[str, tuple[str, bool]]) -> dict[tuple[str, str], list[str]]:
    """``{(part, imported part): ["module:line", ...]}`` over ``{module: (source, is_package)}``."""
    edges: dict[tuple[str, str], list[str]] = {}
    for module, (source, is_package) in sources.items():
        for name, line in imported_modules(source, module, is_package):
            edge = (part_of(module), part_of(name))
            if edge[0] != edge[1]:
                edges.setdefault(edge, []).append(f"{module}:{line}")
    return edges


def plan_breaches(edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The imports that go sideways or up the plan, or come from or go to a part it lacks."""
    breaches = []
    for (importer, imported), where in sorted(edges.items()):
        if importer not in LAYER_OF or imported not in LAYER_OF:
            breaches.append(f"{importer} -> {imported}: not in the plan ({', '.join(where)})")
        elif LAYER_OF[imported] >= LAYER_OF[importer]:
            breaches.append(f"{importer} (layer {LAYER_OF[importer]}) -> {imported} (layer "
                            f"{LAYER_OF[imported]}) at {', '.join(where)}")
    return breaches


def loops(edges) -> list[list[str]]:
    """The import loops between parts (each as a path that ends where it starts)."""
    graph: dict[str, set[str]] = {}
    for importer, imported in edges:
        graph.setdefault(importer, set()).add(imported)
    found, state = [], {}

    def visit(part: str, path: list[str]) -> None:
        state[part] = "open"
        for nxt in sorted(graph.get(part, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[part] = "done"

    for part in sorted(graph):
        if part not in state:
            visit(part, [part])
    return found


@functools.cache
def oppu_sources() -> dict[str, tuple[str, bool]]:
    return {module_name(path): (path.read_text(encoding="utf-8"), path.name == "__init__.py")
            for path in sorted(OPPU.rglob("*.py"))}


def test_every_part_of_oppu_has_a_place_in_the_plan():
    parts = {part_of(module) for module in oppu_sources()}
    assert parts - set(LAYER_OF) == set(), "add the new part to LAYERS here and to docs/internals.md"


def test_imports_follow_the_plan():
    edges = part_imports(oppu_sources())
    assert ("pipeline", "training") in edges and ("tasks", "metrics") in edges  # the check sees imports
    assert plan_breaches(edges) == []


def test_no_import_loop_between_parts():
    assert loops(part_imports(oppu_sources())) == []


def test_training_is_imported_only_by_the_parts_that_run_it():
    importers = {importer for importer, imported in part_imports(oppu_sources()) if imported == "training"}
    assert importers <= {"pipeline", "onboarding", "migration", "analysis", "commands"}


BREAKING = [  # (module, source): imports the plan forbids, at module and function level
    ("oppu.metrics.scoring", "def score(task):\n    from oppu.tasks import get_task\n"),
    ("oppu.evaluation.runner", "from oppu.training.personal import remove_adapter\n"),
    ("oppu.tasks.lamp", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from oppu.data import records\n"),
    ("oppu.serving.engine", "import importlib\nMOD = importlib.import_module('oppu.evaluation.runner')\n"),
    ("oppu.store.adapters", "from ..run_config import RunConfig\n"),
]


@pytest.mark.parametrize(("module", "source"), BREAKING)
def test_the_check_fails_for_an_import_that_breaks_the_plan(module, source):
    assert plan_breaches(part_imports({module: (source, False)}))


def test_the_loop_check_finds_the_old_tasks_metrics_loop():
    edges = {("tasks", "metrics"): ["oppu.tasks.lamp:12"], ("metrics", "tasks"): ["oppu.metrics.scoring:27"]}
    assert loops(edges) == [["metrics", "tasks", "metrics"]]


MAX_MODULE_LINES = 450  # the house plan's bound: a longer module mixes concerns or wants splitting


def modules_over(limit: int, root: Path = OPPU) -> dict[str, int]:
    lengths = {str(path.relative_to(root)): len(path.read_text().splitlines()) for path in root.rglob("*.py")}
    return {name: n for name, n in lengths.items() if n > limit}


def test_no_library_module_is_over_the_plans_length():
    assert modules_over(MAX_MODULE_LINES) == {}


def test_the_length_check_names_a_long_module(tmp_path):
    (tmp_path / "short.py").write_text("x = 1\n")
    (tmp_path / "long.py").write_text("x = 1\n" * (MAX_MODULE_LINES + 1))
    assert modules_over(MAX_MODULE_LINES, tmp_path) == {"long.py": MAX_MODULE_LINES + 1}
