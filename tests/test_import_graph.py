"""The import graph of pipeline/, read with `ast` (nothing is imported): every import runs down the floors,
and no two units (a subpackage of pipeline/, or one of its top-level modules) import each other.

Every import counts: module-level, function-level and `if TYPE_CHECKING:` alike. A function-level import is
still an arrow (it only moves the cycle from import time to call time), so it cannot be used to dodge a floor.

    .venv/bin/python -m pytest -q tests/test_import_graph.py    # names each offending arrow by file and line
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pipeline"

# The floors of pipeline/, lowest first: a unit imports only units on lower floors (never its own floor, never a
# higher one). Derived from what the code imports; a new subpackage or top-level module needs a floor here.
FLOORS: list[tuple[str, ...]] = [
    # 0. No other unit of ours: arch names, filesystem and Ray helpers, the published reference numbers, the
    #    networks, the console's progress lines; `pipeline` is the package's own __init__ (a docstring and
    #    __version__).
    ("pipeline", "pipeline.archs", "pipeline.runtime", "pipeline.cluster", "pipeline.references", "pipeline.models",
     "pipeline.progress"),
    # 1. The params schema (archs) and the data: sources, shards, decoding (runtime).
    ("pipeline.config", "pipeline.data"),
    # 2. What training and evaluation share: metrics (top-k counts, the evaluation forward pass, the AMP
    #    dtype) and the MLflow calls (tracking: rank 0 logs each epoch).
    ("pipeline.metrics", "pipeline.tracking"),
    # 3. Training: the loop, the Ray Train driver, checkpoints, run identities.
    ("pipeline.training",),
    # 4. What uses trained models or runs training: the evaluate stage, analysis (degradation, model reports and
    #    the gradient statistics it hands the loop as a hook), the registry, dvc.yaml's generator.
    ("pipeline.evaluation", "pipeline.analysis", "pipeline.publish", "pipeline.dvcgen"),
    # 5. Front ends of those: the tune search (passes analysis's hook to its trials), the report (evaluation's
    #    table), the stages' shared CLI helpers, the experiments' params.
    ("pipeline.tuning", "pipeline.report", "pipeline.cli", "pipeline.experiments"),
    # 6. `python -m pipeline`: train, evaluate, analyze, publish.
    ("pipeline.__main__",),
]
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


class Arrow(NamedTuple):
    source: str  # the importing module, dotted
    target: str  # the imported module, dotted
    where: str  # path:line of the import statement


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of pipeline/ by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def arrows(root: Path = ROOT) -> list[Arrow]:
    """Module-to-module imports inside pipeline/, wherever they stand in the file. `from a import b` is an
    arrow to the module a.b when there is one (`from pipeline import tracking`), else to a."""
    mods = modules(root)
    found: list[Arrow] = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x`, `from ..a import x`
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] != PACKAGE:
                    continue
                while target not in mods and "." in target:  # `import pipeline.x.y as z`, names in a module
                    target = target.rpartition(".")[0]
                if target != name:
                    found.append(Arrow(name, target, f"{path.relative_to(root)}:{node.lineno}"))
    return sorted(set(found))  # one arrow per statement, however many names it imports


def unit(module: str) -> str:
    """pipeline.training.loop -> pipeline.training; pipeline.config -> pipeline.config; pipeline -> pipeline."""
    return ".".join(module.split(".")[:2])


def unit_arrows(root: Path = ROOT) -> list[Arrow]:
    """The arrows that cross from one unit to another."""
    return [a for a in arrows(root) if unit(a.source) != unit(a.target)]


def unit_cycles(found: list[Arrow]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan), each sorted."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a in found:
        graph[unit(a.source)].add(unit(a.target))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def show(found: list[Arrow]) -> str:
    return "\n".join(f"  {a.where}: {a.source} -> {a.target}" for a in sorted(found, key=lambda a: a.where))


def test_every_unit_has_a_floor() -> None:
    units = {unit(m) for m in modules()}
    assert units - set(FLOOR) == set(), "give these a floor in FLOORS"
    assert set(FLOOR) - units == set(), "FLOORS names units that are gone"


def test_training_imports_nothing_above_its_floor() -> None:
    """Training is what evaluation, analysis, tuning, the report and the registry build on: it imports none of
    them (its validation shares pipeline.metrics with evaluation; gradient statistics come in as a hook)."""
    above = {u for u, level in FLOOR.items() if level > FLOOR["pipeline.training"]}
    up = [a for a in unit_arrows() if unit(a.source) == "pipeline.training" and unit(a.target) in above]
    assert not up, f"pipeline.training imports upper floors:\n{show(up)}"


def test_no_import_runs_up_the_floors() -> None:
    up = [a for a in unit_arrows()
          if unit(a.source) in FLOOR and unit(a.target) in FLOOR and FLOOR[unit(a.target)] >= FLOOR[unit(a.source)]]
    assert not up, f"imports to the same or a higher floor (FLOORS):\n{show(up)}"


def test_no_package_cycle() -> None:
    """Independent of FLOORS: no two units reach each other through imports."""
    found = unit_arrows()
    cycles = unit_cycles(found)
    inside = [a for a in found if any(unit(a.source) in c and unit(a.target) in c for c in cycles)]
    assert not cycles, f"package-level cycles {cycles}, through:\n{show(inside)}"


def test_the_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The reader itself: function-level, TYPE_CHECKING, relative and `from pipeline import module` imports are
    arrows; a cycle made only of function-level imports is found."""
    pkg = tmp_path / PACKAGE
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("def f():\n    from pipeline import high\n")
    (pkg / "low" / "b.py").write_text("from . import a\nfrom typing import TYPE_CHECKING\n"
                                      "if TYPE_CHECKING:\n    from pipeline.high import X\n")
    (pkg / "high.py").write_text("import os\n\ndef g():\n    import pipeline.low.a as a\n")
    found = {(a.source, a.target) for a in arrows(tmp_path)}
    assert found == {("pipeline.low.a", "pipeline.high"), ("pipeline.low.b", "pipeline.low.a"),
                     ("pipeline.low.b", "pipeline.high"), ("pipeline.high", "pipeline.low.a")}
    assert unit_cycles(unit_arrows(tmp_path)) == [["pipeline.high", "pipeline.low"]]
