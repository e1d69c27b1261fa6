"""dvc.yaml's deps match what each stage runs: for every stage, the files of `pipeline/` that its entry point
imports (transitively, function-level imports included) are exactly the files its deps cover.

A missing dep means an edit to code the stage runs does not rerun it (a stale result DVC calls up to date); an
extra one reruns it for code it never touches. Directory deps (`pipeline/models`) must be used whole.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"


def _module_file(module: str) -> Path | None:
    """The file of a dotted module name inside the repository, or None (third-party, stdlib)."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_trivial_package(path: Path) -> bool:
    """A package `__init__.py` with only a docstring and constants: importing it runs no code of ours."""
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and all(
        isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign)) for node in tree.body
    )


def _imports(path: Path) -> set[str]:
    """Dotted names of the `pipeline`/`stages` modules `path` imports anywhere except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for child in node.body for n in ast.walk(child)}
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0] + ".__init__"
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[: -node.level] + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}  # `from pipeline import runtime`
    return {n for n in names if n.split(".")[0] in (PACKAGE, "stages")}


# Non-Python code a module loads at run time: a stage that imports the module runs it too.
NATIVE_SOURCES = {"pipeline/data/jpeg.py": ("pipeline/data/native/roijpeg.c",)}


def import_closure(entry: Path) -> set[str]:
    """Repository-relative paths of the `pipeline/` files that running `entry` may import."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            parts = name.split(".")
            # Importing a.b.c imports the packages a and a.b first.
            for k in range(1, len(parts) + 1):
                found = _module_file(".".join(parts[:k]))
                if found is not None and found not in seen:
                    todo.append(found)
    files = {
        str(p.relative_to(ROOT)) for p in seen
        if p.relative_to(ROOT).parts[0] == PACKAGE and not _is_trivial_package(p)
    }
    return files | {src for module in files for src in NATIVE_SOURCES.get(module, ())}


def _stages() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in spec.items()}


def _entry(stage: dict) -> Path:
    cmd = stage["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith("stages."), stage["cmd"]
    return ROOT / (cmd[2].replace(".", "/") + ".py")


def _code_files(directory: Path) -> set[str]:
    """The code a directory dep covers: its non-trivial .py files and the native sources in it."""
    native = {src for srcs in NATIVE_SOURCES.values() for src in srcs}
    return {
        str(p.relative_to(ROOT)) for p in directory.rglob("*")
        if (p.suffix == ".py" and not _is_trivial_package(p)) or str(p.relative_to(ROOT)) in native
    }


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
            files |= _code_files(path)
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
        problems.append(f"{name}: runs {missing} but does not depend on it (add it to its deps in dvc.yaml)")
    for extra in sorted(covered - closure):
        owner = next((d for d in dirs if extra.startswith(d + "/")), extra)
        problems.append(f"{name}: depends on {owner} but never imports {extra} (list the files it uses instead)")
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
        targets = {_module_file(name) for name in _imports(path)}
        graph[str(path.relative_to(ROOT))] = {
            str(t.relative_to(ROOT)) for t in targets if t is not None and t != path and not _is_trivial_package(t)
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


def suggested_deps(name: str) -> list[str]:
    """The `pipeline/` deps that `name` should list: its closure, a whole directory where it uses all of one."""
    closure = import_closure(_entry(_stages()[name]))
    deps: list[str] = []
    for directory in sorted({str(Path(f).parent) for f in closure} - {PACKAGE}):
        files = _code_files(ROOT / directory)
        if files <= closure:
            deps.append(directory)
            closure -= files
    return sorted(deps + sorted(closure))


if __name__ == "__main__":  # `python tests/test_dvc_deps.py`: print every stage's pipeline/ deps for dvc.yaml
    for stage_name in sorted(_stages()):
        print(f"{stage_name}:\n" + "".join(f"  - {dep}\n" for dep in suggested_deps(stage_name)))
