"""Writes dvc.yaml from what the code already knows, so that no list in it is kept in step by hand.

- Code deps: each stage's `pipeline/` deps are the import closure of its entry point (`python -m stages.X`),
  found by reading the sources with `ast` (function-level imports included, `if TYPE_CHECKING:` blocks not); a
  directory dep stands for a directory whose code the stage uses whole. An edit to code a stage runs reruns it,
  an edit to code it never imports does not.
- Params: tune, train@ARCH, degradation and evaluate@ARCH depend on exactly pipeline/training/identity.py's
  lists (the same keys name Ray's runs and MLflow's resume key); the other stages' params, and every stage's
  command, data deps and outputs, are the table STAGES below.

    python -m pipeline.dvcgen           # (re)write dvc.yaml (`make dvcgen`)
    python -m pipeline.dvcgen --check   # exit 1 with a diff when dvc.yaml is not what this writes

Edit STAGES (or identity.py, or the imports), never dvc.yaml itself: tests/test_dvcgen.py fails when the
committed dvc.yaml differs from what this module writes.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.training import identity

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "pipeline"
DVC_YAML = "dvc.yaml"
ITEM = "${item}"  # the arch of a foreach stage, as DVC writes it


# --- the import closure of a stage's entry point --------------------------------------------------------------

# Non-Python code a module loads at run time: a stage that imports the module runs it too.
NATIVE_SOURCES = {"pipeline/data/jpeg.py": ("pipeline/data/native/roijpeg.c",)}


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a dotted module name inside the repository, or None (third-party, stdlib)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_trivial_package(path: Path) -> bool:
    """A package `__init__.py` with only a docstring and constants: importing it runs no code of ours."""
    tree = ast.parse(path.read_text())
    return path.name == "__init__.py" and all(
        isinstance(node, (ast.Expr, ast.Assign, ast.AnnAssign)) for node in tree.body
    )


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names of the `pipeline`/`stages` modules `path` imports anywhere except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for child in node.body for n in ast.walk(child)}
    package = ".".join(path.relative_to(root).with_suffix("").parts)
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


def import_closure(entry: Path, root: Path = ROOT) -> set[str]:
    """Repository-relative paths of the `pipeline/` files (and native sources) that running `entry` may import."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imports(path, root):
            parts = name.split(".")
            # Importing a.b.c imports the packages a and a.b first.
            for k in range(1, len(parts) + 1):
                found = module_file(".".join(parts[:k]), root)
                if found is not None and found not in seen:
                    todo.append(found)
    files = {
        str(p.relative_to(root)) for p in seen
        if p.relative_to(root).parts[0] == PACKAGE and not is_trivial_package(p)
    }
    return files | {src for module in files for src in NATIVE_SOURCES.get(module, ())}


def code_files(directory: Path, root: Path = ROOT) -> set[str]:
    """The code a directory dep covers: its non-trivial .py files and the native sources in it."""
    native = {src for srcs in NATIVE_SOURCES.values() for src in srcs}
    return {
        str(p.relative_to(root)) for p in directory.rglob("*")
        if (p.suffix == ".py" and not is_trivial_package(p)) or str(p.relative_to(root)) in native
    }


def code_deps(entry: Path, root: Path = ROOT) -> list[str]:
    """The `pipeline/` deps of a stage whose entry point is `entry`: its import closure, sorted, with a
    directory in place of its files where the stage uses all of that directory's code."""
    closure = import_closure(entry, root)
    deps: list[str] = []
    for directory in sorted({str(Path(f).parent) for f in closure} - {PACKAGE}):
        if any(d == directory or directory.startswith(d + "/") for d in deps):
            continue  # inside a directory already listed whole
        files = code_files(root / directory, root)
        if files <= closure:
            deps.append(directory)
    covered = {f for d in deps for f in code_files(root / d, root)}
    return sorted(deps + sorted(closure - covered))


# --- the stage table --------------------------------------------------------------------------------------------


class Flow(list):
    """A list of scalars written on one line: `[a, b]`."""


@dataclass(frozen=True)
class Note:
    """A value of dvc.yaml with a comment: `inline` after it on its line, `above` on the lines before it."""

    value: Any
    inline: str = ""
    above: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml. `params` is a list of dotted keys or the name of an identity.py stage; `deps` are
    the deps besides the entry point and its code (data, other stages' outputs); `foreach` makes it one stage per
    item of that value (e.g. `${model.archs}`), `${item}` standing for the item."""

    cmd: str
    params: tuple[Any, ...] | str
    deps: tuple[Any, ...] = ()
    outs: tuple[Any, ...] = ()
    metrics: tuple[Any, ...] = ()
    plots: tuple[Any, ...] = ()
    foreach: str | None = None
    above: tuple[str, ...] = ()  # comment lines before the stage
    params_above: tuple[str, ...] = ()
    order: tuple[str, ...] = field(default=("outs", "metrics", "plots"))  # as the sections are written

    @property
    def entry(self) -> str:
        words = self.cmd.split()
        if words[:2] != ["python", "-m"] or not words[2].startswith("stages."):
            raise ValueError(f"{DVC_YAML}: a stage's cmd must be `python -m stages.NAME ...`, not {self.cmd!r}")
        return words[2].replace(".", "/") + ".py"


MANIFEST = Note("data/dataset.json", inline="the shards' manifest: changes exactly when they do")
ARCHS = "${model.archs}"

STAGES: dict[str, Stage] = {
    "synthesize": Stage(
        cmd="python -m stages.synthesize --out data/synthetic",
        params=("seed", "data.source", "data.synthetic", "data.workers"),
        outs=("data/synthetic",),
    ),
    "prepare": Stage(
        cmd="python -m stages.prepare --record data/dataset.json",
        params=("data",),
        deps=(Note("${data.raw_dir}", inline="the raw dataset, by path: never copied into the DVC cache"),),
        outs=(
            Note({"${data.shards_dir}": {"persist": True, "cache": False}}, above=(
                "persist: a killed prepare resumes (only missing shards are written); prepare itself starts over "
                "cleanly when the plan (source, options) changes, and refuses to replace another dataset's shards. "
                "cache: false: the shards are tracked (a deleted or edited shard reruns prepare) but never copied "
                "into .dvc/cache, which would store them twice (147 GB for ImageNet; Lustre/EFS cannot reflink). "
                "With a URI data.shards_dir (s3://, gs://), delete this entry: DVC 3 tracks no external outputs, "
                "and data/dataset.json below carries the dataset's identity on its own.",
            )),
            Note({"data/dataset.json": {"cache": False}}, above=(
                "A byte copy of the manifest (every shard's size and sha256): what downstream stages depend on, so "
                "they rerun exactly when the shards change, and DVC never re-hashes the shards for them. Not "
                "cached, like the shards it describes: a checkout must never restore the manifest of shards that "
                "are not there.",
            )),
        ),
    ),
    "tune": Stage(
        cmd="python -m stages.tune --out tune",
        params="tune",
        deps=(MANIFEST,),
        outs=("tune/best.json", "tune/trials.csv", "tune/lr_vs_error.png"),
        above=("One ASHA search per arch of tune.archs; trials train on `train` (train minus minival) and are "
               "scored on the minival split that prepare holds out of train: the val set is read only by "
               "evaluate@ARCH (docs/tuning.md).",),
    ),
    "train": Stage(
        foreach=ARCHS,
        cmd=f"python -m stages.train --arch {ITEM} --out models/{ITEM} --metrics metrics/train/{ITEM}.json "
            f"--curve plots/train/{ITEM}.csv --best tune/best.json",
        params="train",
        params_above=("Only this arch's own entry of train.epochs_by_arch: editing another arch's leaves this "
                      "stage alone.",),
        deps=(MANIFEST, "tune/best.json"),
        outs=(f"models/{ITEM}",),
        metrics=(f"metrics/train/{ITEM}.json",),
        plots=({f"plots/train/{ITEM}.csv": {"x": "epoch", "y": "val_top1_err"}},),
    ),
    "evaluate": Stage(
        foreach=ARCHS,
        cmd=f"python -m stages.evaluate --arch {ITEM} --model models/{ITEM} --out metrics/eval/{ITEM}.json",
        params="evaluate",
        deps=(f"models/{ITEM}", MANIFEST),
        metrics=(f"metrics/eval/{ITEM}.json",),
        outs=(f"reports/eval/{ITEM}_details.json",),
        order=("metrics", "outs", "plots"),
    ),
    "report": Stage(
        cmd="python -m stages.report --out reports",
        params=("model.archs",),
        deps=("metrics/eval", "metrics/train", "plots/train", "reports/eval"),
        outs=("reports/error_table.md", "reports/error_table.csv", "reports/error_vs_depth.png",
              "reports/training_curves.png", "reports/confusion.png"),
    ),
    "degradation": Stage(
        cmd="python -m stages.degradation --out reports/degradation --metrics metrics/degradation.json",
        params="degradation",
        deps=(MANIFEST,),
        outs=("reports/degradation",),
        metrics=("metrics/degradation.json",),
        above=("Plain vs residual nets of two depths, one recipe, trained in-process (He et al. 2015, Fig. 4 / "
               "Fig. 6); `degradation.enabled: false` writes only a summary saying so. Figures also go to MLflow.",),
    ),
    "register": Stage(
        cmd="python -m stages.register --out reports/registry.json",
        params=("registry", "tracking", "model.archs"),
        deps=("models", "metrics/eval", "metrics/train", "reports/error_table.md"),
        outs=("reports/registry.json",),
    ),
}

# dvc.yaml's top-level plots: figures over several outputs (`dvc plots show`, `dvc plots diff`).
PLOTS = [{"error vs depth": {"template": "simple", "x": "layers",
                             "y": {"reports/error_table.csv": Flow(["top1_err", "top5_err"])}}}]

HEADER = (
    "GENERATED by `python -m pipeline.dvcgen` (`make dvcgen`): edit pipeline/dvcgen.py's stage table, "
    "pipeline/training/identity.py or the stages' imports, not this file (tests/test_dvcgen.py compares them).",
    "",
    "The DAG. Each stage depends on its entry point and the `pipeline/` code it imports, on its data, and on the "
    "params that change its result (DVC does not record ${...} values as dependencies): for tune, train@ARCH, "
    "degradation and evaluate@ARCH exactly identity.py's lists, so runtime knobs (eval.batch_size, "
    "train.max_failures, storage, threads, tracking) rerun nothing. Every output but the data is in DVC's cache "
    "and ignored by git: `dvc exp run` keeps each experiment's metrics, plots and reports with it, and "
    "`dvc exp show`, `dvc metrics diff` and `dvc plots diff` read them from there (docs/experiments.md).",
)


def stage_params(stage: Stage) -> list[str]:
    """The params of `stage` as dvc.yaml lists them (`${item}` for the arch of a foreach stage)."""
    if isinstance(stage.params, str):
        return [k.replace(identity.ARCH, ITEM) for k in identity.stage_params(stage.params)]
    return list(stage.params)


def spec(root: Path = ROOT) -> dict[str, Any]:
    """dvc.yaml as data (comments dropped): what `yaml.safe_load` of the written file gives."""
    return _plain(_tree(root))


def _tree(root: Path) -> dict[str, Any]:
    stages: dict[str, Any] = {}
    for name, stage in STAGES.items():
        entry = stage.entry
        if not (root / entry).is_file():
            raise FileNotFoundError(f"pipeline/dvcgen.py: stage {name}: {entry} (from its cmd) does not exist")
        body: dict[str, Any] = {
            "cmd": stage.cmd,
            "deps": [entry, *code_deps(root / entry, root), *stage.deps],
            "params": Note(stage_params(stage), above=stage.params_above),
        }
        for section in stage.order:
            if getattr(stage, section):
                body[section] = list(getattr(stage, section))
        stages[name] = Note({"foreach": stage.foreach, "do": body} if stage.foreach else body, above=stage.above)
    return {"stages": stages, "plots": PLOTS}


def _plain(node: Any) -> Any:
    if isinstance(node, Note):
        return _plain(node.value)
    if isinstance(node, dict):
        return {k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


# --- a small YAML writer that keeps comments -------------------------------------------------------------------

WIDTH = 116


def _scalar(value: Any) -> str:
    if value is True or value is False:
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if not text or text[0] in "!&*[]{}|>'\"%@`#,?:-" or ": " in text or " #" in text or text != text.strip():
        raise ValueError(f"pipeline/dvcgen.py: {text!r} needs YAML quoting, which this writer does not do")
    return text


def _comment(paragraphs: tuple[str, ...], pad: str) -> list[str]:
    """Each paragraph as `# ` lines wrapped to WIDTH; an empty paragraph is an empty `#` line."""
    lines: list[str] = []
    for text in paragraphs:
        wrapped = textwrap.wrap(text, WIDTH - len(pad) - 2, break_on_hyphens=False, break_long_words=False)
        lines += [f"{pad}# {line}".rstrip() for line in wrapped or [""]]
    return lines


def _folded(prefix: str, text: str, pad: str) -> list[str]:
    """`prefix text` as a plain scalar folded over lines of at most WIDTH (YAML joins them with spaces), broken
    before an option (`--name value`) where it can be."""
    chunks = [c if i == 0 else "--" + c for i, c in enumerate(text.split(" --"))]
    lines, line = [], prefix
    for chunk in chunks:
        if len(line) + 1 + len(chunk) > WIDTH and line != prefix:
            lines.append(line)
            line = pad + chunk
        else:
            line += " " + chunk if line != pad else chunk
    return [*lines, line]


def _emit(node: Any, indent: int) -> list[str]:
    """The lines of a mapping or a block list at `indent` spaces."""
    pad = " " * indent
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            note = value if isinstance(value, Note) else Note(value)
            out += _comment(note.above, pad)
            out += _entry(f"{pad}{_scalar(key)}:", note, indent + 2)
        return out
    for item in node:
        note = item if isinstance(item, Note) else Note(item)
        out += _comment(note.above, pad)
        out += _entry(f"{pad}-", note, indent + 2, item=True)
    return out


def _entry(prefix: str, note: Note, inner: int, item: bool = False) -> list[str]:
    value, tail = note.value, f"  # {note.inline}" if note.inline else ""
    if isinstance(value, dict) and item and len(value) == 1 and isinstance(next(iter(value.values())), dict):
        # `- path:` followed by its options, as DVC's docs write an output with options
        (key, opts), = value.items()
        return [f"{prefix} {_scalar(key)}:{tail}", *_emit(opts, inner + 2)]
    if isinstance(value, dict):
        if item:
            raise ValueError("pipeline/dvcgen.py: a list item must be a scalar or a one-key mapping")
        return [prefix + tail, *_emit(value, inner)]
    if isinstance(value, Flow):
        return [f"{prefix} [{', '.join(_scalar(v) for v in value)}]{tail}"]
    if isinstance(value, list):
        return [prefix + tail, *_emit(value, inner)]
    text = _scalar(value)
    if len(prefix) + 1 + len(text) + len(tail) > WIDTH:
        return _folded(prefix, text, " " * inner)
    return [f"{prefix} {text}{tail}"]


def render(root: Path = ROOT) -> str:
    """The text of dvc.yaml."""
    tree = _tree(root)
    lines = _comment(HEADER, "") + ["stages:"]
    for i, (name, stage) in enumerate(tree["stages"].items()):
        if i:
            lines.append("")
        lines += _emit({name: stage}, 2)
    lines += ["", "plots:", *_emit(tree["plots"], 2)]
    return "\n".join(lines) + "\n"


def check(text: str, root: Path = ROOT) -> str:
    """A unified diff from `text` (a dvc.yaml) to what the generator writes; empty when they are equal."""
    want = render(root)
    return "".join(difflib.unified_diff(text.splitlines(keepends=True), want.splitlines(keepends=True),
                                        f"{DVC_YAML} (committed)", f"{DVC_YAML} (python -m pipeline.dvcgen)"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.dvcgen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 with a diff when dvc.yaml differs from what would be written")
    ap.add_argument("--output", type=Path, default=ROOT / DVC_YAML, help="the file (default: this checkout's dvc.yaml)")
    args = ap.parse_args(argv)
    path = args.output
    if args.check:
        diff = check(path.read_text() if path.is_file() else "")
        if diff:
            sys.stdout.write(diff)
            print(f"{path}: not what `python -m pipeline.dvcgen` writes; run it (make dvcgen) and commit the result",
                  file=sys.stderr)
            return 1
        return 0
    text = render()
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
