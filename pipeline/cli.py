"""Shared command-line plumbing for `python -m stages.NAME` and `python -m pipeline ...`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Params, ParamsError, load_params


def stage_args(
    description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> tuple[Params, argparse.Namespace]:
    """Parse `--params FILE` and repeated `--set key.sub=value`, then validate.

    A bad parameter exits with code 2 and one line naming the file and the key, before anything is written.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one parameter, e.g. --set train.lr=0.05 (repeatable)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return params, args


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit non-zero (no traceback for user errors)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
