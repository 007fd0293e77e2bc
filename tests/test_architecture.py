"""The import graph of src/ and experiments/: no import from a lower layer to a higher one, and no import cycle.

LAYERS is the one written order (README "Extending outlierlab" points here). Every module is placed by its package
or top module (`outlierlab.models.sites` -> `models`, `outlierlab.runner` -> `runner`); a module not placed fails the
test, so a new package is given its layer when it is added. Imports are read with ast from every `import` / `from ... import`
statement, those inside functions included (a lazy import is still an arrow).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

# Lowest first. A module may import its own layer and the ones below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # foundations: no outlierlab imports but each other's
    ("errors", "environment", "results", "tables", "figures", "override_types", "tracking", "cli"),
    # architecture data, site resolver, hooks, the edit primitive, loading (the package root only registers
    # models.source's config resolvers)
    ("models", "outlierlab"),
    ("probes",),  # read-only observation
    ("quant", "interventions"),  # edits
    ("evals",),  # ppl, zero-shot, stop words
    ("studies", "train", "finetune"),  # builders the recipes call
    ("reports",),  # tables and figures from results/
    ("runner", "sweep"),  # preflight, run, record; sweep cell identity
    # commands that drive runs: the SLURM launcher (preflights each cell), the prepared GPU check (runs studies in
    # subprocesses), reproduce (reruns a record)
    ("launcher", "hydra_plugins", "gpu_check", "reproduce"),
    ("experiments",),  # recipes
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# Downward arrows that are still wrong. A recipe produces a result: reports/ only reads results/ (a recipe that
# needs the same shaping gets it from the library below), and the runner runs recipes, not the reverse. A recipe
# never imports another recipe: what two recipes share lives in src/.
FORBIDDEN = {("experiments", "reports"), ("experiments", "runner"), ("experiments", "sweep"),
             ("experiments", "launcher"), ("experiments", "experiments")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "src":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "outlierlab":
        parts = parts[1:] or ["outlierlab"]
    return parts[0]


def _ours(name: str) -> bool:
    return name.split(".")[0] in ("outlierlab", "experiments") or name.startswith("hydra_plugins.outlierlab_")


def import_graph() -> dict[str, set[str]]:
    """module -> the outlierlab / experiments modules it imports (`from a.b import c` counts as a.b.c when a.b.c
    is a module, else a.b)."""
    files = [*sorted((ROOT / "src").rglob("*.py")), *sorted((ROOT / "experiments").glob("*.py"))]
    modules = {_module_name(path): path for path in files}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if _ours(alias.name))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _ours(node.module):
                for alias in node.names:
                    edges.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                              else node.module)
        graph[module] = {edge for edge in edges if edge != module}
    return graph


def test_every_module_has_a_layer():
    unplaced = sorted(module for module in import_graph() if _layer(module) not in RANK)
    assert not unplaced, f"modules without a layer (add their package to LAYERS): {unplaced}"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} ({_layer(module)}) imports {target} ({_layer(target)})"
                  for module, targets in graph.items() for target in targets
                  if RANK[_layer(target)] > RANK[_layer(module)] or (_layer(module), _layer(target)) in FORBIDDEN)


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    upward = upward_imports(import_graph())
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's modules (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], path[len(path):] = 1, [node]
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target in graph and target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_there_is_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"x": {"y"}, "y": set(), "a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert find_cycle(graph) == expected


def test_the_layer_check_sees_a_planted_upward_import():
    planted = {"outlierlab.probes.planted": {"outlierlab.studies.variants", "outlierlab.models.sites"},
               "experiments.planted": {"outlierlab.runner", "experiments.atlas", "outlierlab.studies.atlas"},
               "experiments.shaped": {"outlierlab.reports.atlas"}}
    assert upward_imports(planted) == [
        "experiments.planted (experiments) imports experiments.atlas (experiments)",
        "experiments.planted (experiments) imports outlierlab.runner (runner)",
        "experiments.shaped (experiments) imports outlierlab.reports.atlas (reports)",
        "outlierlab.probes.planted (probes) imports outlierlab.studies.variants (studies)"]
