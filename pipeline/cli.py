"""Shared command-line plumbing for `python -m stages.NAME` and `python -m pipeline ...`."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pipeline.config import Params, ParamsError, load_params

# Set by `--debug` (or by the user): expected failures re-raise with their traceback instead of one line.
DEBUG_ENV = "PIPELINE_DEBUG"

# Failures that are the user's input (params, data, a model path or URI, an output held by another run), named by
# module and class so that checking them imports nothing (mlflow, torch): one line each, never a traceback.
USER_ERRORS = frozenset({
    "pipeline.config.ParamsError",
    "pipeline.data.sources.DataError",  # ManifestError, ShardChecksumError
    "pipeline.models.pretrained.PretrainedNotFound",
    "pipeline.runtime.OutputLocked",
    "pipeline.training.trainer.TrainingRefused",
    "pipeline.tracking.ModelRefused",
    "mlflow.exceptions.MlflowException",
    "builtins.FileNotFoundError",
    "builtins.NotADirectoryError",
    "builtins.IsADirectoryError",
    "builtins.PermissionError",
})


def is_user_error(exc: BaseException) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(exc).__mro__)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (MLflow's and pydantic's span several)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """Expected failures (see USER_ERRORS) become one `error: ...` line on stderr and a non-zero exit (2 for a
    bad parameter, 1 otherwise); anything else, or everything under `--debug` / PIPELINE_DEBUG=1, keeps its
    traceback."""
    try:
        yield
    except Exception as exc:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0") or not is_user_error(exc):
            raise
        fail(one_line(exc), 2 if isinstance(exc, ParamsError) else 1)


def run_main(main: Callable[[], None]) -> None:
    """A stage's `if __name__ == "__main__":` entry: `main()` under `user_errors`."""
    with user_errors():
        main()


def arch_name(value: str) -> str:
    """argparse type of `--arch`: a name of the model registry (pipeline.archs, no torch import), else one
    line with the closest names."""
    from pipeline.archs import ARCHS

    if value in ARCHS:
        return value
    close = difflib.get_close_matches(value, sorted(ARCHS), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise argparse.ArgumentTypeError(f"unknown arch {value!r}; {hint}known: {', '.join(sorted(ARCHS))}")


def arch_help() -> str:
    """`--arch`'s help: the names of the model registry (pipeline.archs)."""
    from pipeline.archs import ARCHS

    return f"a network of the model registry: {', '.join(sorted(ARCHS))}"


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: must be at least 1")
    return n


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")


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
    add_debug(parser)
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.debug:
        os.environ[DEBUG_ENV] = "1"
    try:
        params = load_params(args.params, args.overrides)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return params, args


def fail(message: str, code: int = 1) -> None:
    """One clear line on stderr, then exit non-zero (no traceback for user errors); URIs lose their userinfo."""
    from pipeline.runtime import redact_uri

    print(f"error: {redact_uri(message)}", file=sys.stderr)
    raise SystemExit(code)
