"""Console progress: one plain line per epoch, per cadence step of prepare and evaluation, per finished tune trial.

Plain lines, not a redrawn bar, because the places people watch a run are logs: `dvc repro` output, `ray job
logs`, a Kubernetes pod's log, where a carriage-return bar is one unreadable line (tqdm is kept for prepare on
an interactive terminal only). The functions here are pure formatting (tests pin their exact strings); the
callers print with `print_line`, flushed, so a line shows up in a log the moment it is written.

    resnet50 epoch 3/90  loss 2.314  val top-1 err 41.2%  1,234 img/s  epoch 4m12s  ETA 6h01m
    prepare 13/128 shards (10%)  13,312 img  444 img/s  elapsed 30s  ETA 4m25s
    evaluate resnet50 val 10,000/50,000 img (20%)  2,000 img/s  elapsed 5s  ETA 20s
    tune resnet18 trials 5/8 done (3 finished, 2 stopped, 0 failed)  2 running  1 pending  best minival top-1 err 41.2%
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable


def format_duration(seconds: float | None) -> str:
    """A duration for a human: "1h02m", "3m05s", "42s", "2d03h"; "?" when unknown (None, NaN, inf, < 0)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = math.floor(seconds + 0.5)  # half up (round() would take 2.5 s to "2s")
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def eta_s(done: float, total: float, elapsed_s: float) -> float | None:
    """Seconds left if the rest goes at the pace so far (`elapsed_s` for `done` of `total`): None before
    anything is done, 0 once `done` reaches `total`."""
    if done >= total:
        return 0.0
    if done <= 0 or elapsed_s < 0:
        return None
    return (total - done) * elapsed_s / done


def format_rate(per_s: float | None, unit: str) -> str:
    """ "1,234 img/s"; "? img/s" when unknown."""
    if per_s is None or not math.isfinite(per_s):
        return f"? {unit}/s"
    return f"{per_s:,.0f} {unit}/s"


def epoch_line(arch: str, epoch: int, epochs: int, *, loss: float, images_per_s: float, epoch_s: float,
               eta: float | None, val_top1_err: float | None = None) -> str:
    """The training loop's line for epoch `epoch` (1-based) of `epochs`; `val_top1_err` (percent) only on an
    epoch that validated (None or NaN: left out)."""
    parts = [f"{arch} epoch {epoch}/{epochs}", f"loss {loss:.3f}"]
    if val_top1_err is not None and math.isfinite(val_top1_err):
        parts.append(f"val top-1 err {val_top1_err:.1f}%")
    parts += [format_rate(images_per_s, "img"), f"epoch {format_duration(epoch_s)}", f"ETA {format_duration(eta)}"]
    return "  ".join(parts)


def progress_line(label: str, done: int, total: int, unit: str, *, elapsed_s: float, rate: float | None,
                  eta: float | None, rate_unit: str | None = None, images: int | None = None) -> str:
    """A counted job's line: "LABEL DONE/TOTAL UNIT (P%)", the images so far when the count is of something else
    (shards), the rate (per second of `rate_unit`, default `unit`), elapsed time, and the ETA until done."""
    pct = 100 * done // total if total > 0 else 100
    parts = [f"{label} {done:,}/{total:,} {unit} ({pct}%)"]
    if images is not None:
        parts.append(f"{images:,} img")
    parts += [format_rate(rate, rate_unit or unit), f"elapsed {format_duration(elapsed_s)}"]
    if done < total:
        parts.append(f"ETA {format_duration(eta)}")
    return "  ".join(parts)


def trials_line(arch: str, *, total: int, finished: int, stopped: int, failed: int, running: int, pending: int,
                best: float | None = None, metric: str = "minival top-1 err") -> str:
    """Tune's line for one arch's search: trials done of `total` (finished their epochs, stopped early by ASHA,
    failed), running, pending, and the best `metric` (percent) any trial reported so far."""
    done = finished + stopped + failed
    parts = [f"tune {arch} trials {done}/{total} done ({finished} finished, {stopped} stopped, {failed} failed)",
             f"{running} running", f"{pending} pending"]
    if best is not None and math.isfinite(best):
        parts.append(f"best {metric} {best:.1f}%")
    return "  ".join(parts)


def print_line(line: str) -> None:
    """Write one progress line to stdout, flushed: it reaches a log (`ray job logs`, `dvc repro`) at once.
    Written, not `print`ed: Ray Train replaces `print` in its workers with one that both prints (when stdout is
    wrapped, as in a Ray worker) and logs the message, which showed every epoch line twice in the driver's
    console."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Progress:
    """Progress of a counted job (shards, images) as plain lines: one when the count crosses each `every`
    fraction of `total` (10% by default), one at least every `every_s` seconds while it moves, and one at the
    end. `done` and `images` start where a resumed job already is; rates and ETA count only this run's work.
    `out` None: count, print nothing."""

    def __init__(self, label: str, total: int, unit: str, *, done: int = 0, images: int | None = None,
                 every: float = 0.1, every_s: float = 60.0, out: Callable[[str], None] | None = print_line,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.done, self.images = done, images
        self._start_done, self._start_images = done, images or 0
        self._every, self._every_s, self._out, self._clock = every, every_s, out, clock
        self._t0 = self._last = clock()
        self._next = self._next_mark(done)

    def _next_mark(self, done: int) -> float:
        step = max(self._every * self.total, 1)
        return (math.floor(done / step) + 1) * step

    def advance(self, n: int = 1, images: int = 0) -> str | None:
        """Count `n` more (and `images` more images, when images are tracked); returns the line printed, if any."""
        self.done += n
        if self.images is not None:
            self.images += images
        now = self._clock()
        if not (self.done >= self.total or self.done >= self._next or now - self._last >= self._every_s):
            return None
        self._last, self._next = now, self._next_mark(self.done)
        line = self.line(now)
        if self._out is not None:
            self._out(line)
        return line

    def line(self, now: float | None = None) -> str:
        elapsed = (self._clock() if now is None else now) - self._t0
        if self.images is not None:
            work, rate_unit = self.images - self._start_images, "img"
        else:
            work, rate_unit = self.done - self._start_done, self.unit
        rate = work / elapsed if elapsed > 0 else None
        eta = eta_s(self.done - self._start_done, self.total - self._start_done, elapsed)
        return progress_line(self.label, self.done, self.total, self.unit, elapsed_s=elapsed, rate=rate, eta=eta,
                             rate_unit=rate_unit, images=self.images)
