"""A preset as `dvc exp run -S` overrides of the baseline params.yaml: presets compose, they are never copied over.

A preset (configs/NAME.yaml) lists only what differs from params.yaml. Run as a DVC experiment, each of its keys
becomes one `-S` override, so the experiment's params are the baseline plus exactly that diff (`dvc params diff`,
`dvc exp show` show it) and params.yaml itself stays the committed default (docs/experiments.md):

    python -m pipeline.experiments show configs/fast.yaml        # the overrides, one per line
    python -m pipeline.experiments run configs/fast.yaml -n fast  # dvc exp run -n fast -S ... -S ...

Values are written in Hydra's override grammar, which `dvc exp run -S` parses: strings quoted (so `off` stays the
string it is in the preset), a mapping the preset replaces (`train.epochs_by_arch`) deleted and added again, since
a plain override would merge it into the baseline's entries; a key the baseline file lacks is added (`++`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import EXTENDS, Params, ParamsError, resolve_tree


def hydra_value(value: Any) -> str:
    """`value` in Hydra's override grammar: null, true/false, numbers, quoted strings, [lists] and {maps}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Hydra override for a {type(value).__name__}: {value!r}")


def baseline_of(preset: str | Path) -> Path:
    """The file at the end of the preset's `extends` chain (params.yaml for every preset in configs/)."""
    path, seen = Path(preset), set()
    while True:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else None
        base = tree.get(EXTENDS) if isinstance(tree, dict) else None
        if not isinstance(base, str) or path.resolve() in seen:
            return path
        seen.add(path.resolve())
        path = path.parent / base


def overrides(preset: str | Path) -> list[str]:
    """The `-S` values that turn the baseline (the end of the preset's `extends` chain) into the preset resolved
    over it: one per key whose value differs. Raises ParamsError naming the file when one is missing or invalid."""
    preset = Path(preset)
    want = resolve_tree(preset)
    baseline = baseline_of(preset)
    if baseline == preset:
        raise ParamsError(f"{preset}: no `{EXTENDS}:` (a preset lists its differences from params.yaml)")
    have = resolve_tree(baseline)
    out: list[str] = []

    def walk(node: dict[str, Any], ref: dict[str, Any] | None, prefix: str, model: type[BaseModel]) -> None:
        for key, value in node.items():
            field = model.model_fields.get(key)
            sub = field.annotation if field is not None else None
            dotted = prefix + key
            if ref is None or key not in ref:
                out.append(f"++{dotted}={hydra_value(value)}")  # a key the baseline file lacks: added
            elif isinstance(sub, type) and issubclass(sub, BaseModel) and isinstance(value, dict):
                walk(value, ref[key] if isinstance(ref[key], dict) else None, dotted + ".", sub)
            elif value == ref[key]:
                continue
            elif isinstance(value, dict) and isinstance(ref[key], dict):
                out.extend([f"~{dotted}", f"+{dotted}={hydra_value(value)}"])  # replaced, as the preset means
            else:
                out.append(f"{dotted}={hydra_value(value)}")

    walk(want, have, "", Params)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    show = sub.add_parser("show", help="print a preset's overrides of its baseline, one per line")
    show.add_argument("preset", type=Path, help="a preset, e.g. configs/fast.yaml")
    run = sub.add_parser("run", help="dvc exp run with a preset's overrides; further arguments go to dvc")
    run.add_argument("preset", type=Path, help="a preset, e.g. configs/fast.yaml")
    args, rest = ap.parse_known_args(argv)
    if args.command == "show" and rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        sets = overrides(args.preset)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "show":
        print("\n".join(sets))
        return 0
    cmd = ["dvc", "exp", "run", *rest, *(arg for s in sets for arg in ("-S", s))]
    print(" ".join(cmd), file=sys.stderr)
    os.execvp(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
