"""dvc.yaml's deps match what each stage runs: for every stage the generator (pipeline/dvcgen.py) writes, the
files of `pipeline/` that its entry point imports (transitively, function-level imports included) are exactly the
files its deps cover.

A missing dep means an edit to code the stage runs does not rerun it (a stale result DVC calls up to date); an
extra one reruns it for code it never touches. Directory deps (`pipeline/models`) must be used whole.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import dvcgen
from pipeline.dvcgen import ROOT, code_files, import_closure, imports, is_trivial_package, module_file

PACKAGE = dvcgen.PACKAGE


def _stages() -> dict[str, dict]:
    """The stages as the generator writes them (tests/test_dvcgen.py: the committed dvc.yaml is that)."""
    return {name: stage.get("do", stage) for name, stage in dvcgen.spec()["stages"].items()}


def _entry(stage: dict) -> Path:
    cmd = stage["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith("stages."), stage["cmd"]
    return ROOT / (cmd[2].replace(".", "/") + ".py")


def covered_by_deps(deps: list) -> tuple[set[str], list[str]]:
    """The `pipeline/` .py files that a stage's deps cover, and its directory deps."""
    files: set[str] = set()
    dirs: list[str] = []
    for dep in deps:
        dep = dep if isinstance(dep, str) else next(iter(dep))
        if not dep.startswith(PACKAGE + "/"):
            continue
        path = ROOT / dep
        if path.is_dir():
            dirs.append(dep)
            files |= code_files(path)
        else:
            files.add(dep)
    return files, dirs


def dep_problems(name: str, stage: dict) -> list[str]:
    entry = _entry(stage)
    closure = import_closure(entry)
    covered, dirs = covered_by_deps(stage.get("deps", []))
    problems = []
    if str(entry.relative_to(ROOT)) not in stage.get("deps", []):
        problems.append(f"{name}: its entry point {entry.relative_to(ROOT)} is not a dep")
    for missing in sorted(closure - covered):
        problems.append(f"{name}: runs {missing} but does not depend on it (pipeline.dvcgen.code_deps misses it)")
    for extra in sorted(covered - closure):
        owner = next((d for d in dirs if extra.startswith(d + "/")), extra)
        problems.append(f"{name}: depends on {owner} but never imports {extra} (a directory dep must be used whole)")
    return problems


@pytest.mark.parametrize("name", sorted(_stages()))
def test_stage_deps_are_its_import_closure(name: str) -> None:
    assert dep_problems(name, _stages()[name]) == []


def test_a_removed_dep_is_reported() -> None:
    """The check itself can fail: evaluate without the transforms it decodes with is named."""
    stage = dict(_stages()["evaluate"])
    stage["deps"] = [d for d in stage["deps"] if d != "pipeline/data/transforms.py"]
    assert any("pipeline/data/transforms.py" in p for p in dep_problems("evaluate", stage))


def test_closure_follows_function_level_and_package_imports(tmp_path: Path) -> None:
    closure = import_closure(ROOT / "stages" / "evaluate.py")
    assert "pipeline/evaluation.py" in closure
    assert "pipeline/data/transforms.py" in closure  # imported inside functions only
    assert "pipeline/__init__.py" not in closure  # docstring and version only


def import_graph() -> dict[str, set[str]]:
    """`pipeline/` file -> the `pipeline/` files it imports (function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        targets = {module_file(name) for name in imports(path)}
        graph[str(path.relative_to(ROOT))] = {
            str(t.relative_to(ROOT)) for t in targets if t is not None and t != path and not is_trivial_package(t)
        }
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of files that ends where it starts), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_pipeline_import_graph_has_no_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_find_cycle_finds_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
