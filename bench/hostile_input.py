"""`python -m bench.hostile_input [--out reports/hostile_input.md]`: the hostile- and careless-input drill.

Every try runs the way a user would run it (a fresh process in a fresh folder, the real CLI, DVC-stage and
library entry points) and the table records what the user sees: the input, the last line printed, the exit
code, whether a traceback appeared, and what was left on disk. Each row also says what was expected and whether
it held, so the drill is a check as well as a record; it exits non-zero if any row did not hold.

This is evidence for reviewers, not a test: the same behaviours are asserted one by one in
tests/test_hardening.py (fast and subprocess tiers), where a regression fails `make test`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Row:
    area: str
    input: str
    expected: str
    message: str = ""
    exit_code: int | str = ""
    traceback: bool = False
    left: str = ""
    held: bool = False
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def last_line(self) -> str:
        lines = [ln for ln in (self.err or self.out).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else ""


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "PIPELINE_"))}
    e.update(PYTHONPATH=str(ROOT), MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK="true", RAY_USAGE_STATS_ENABLED="0",
             DVC_NO_ANALYTICS="1", PATH=f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    e.update(extra)
    return e


def run(args: list[str], cwd: Path, timeout: float = 600, **extra: str) -> Result:
    p = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env(**extra))
    return Result(p.returncode, p.stdout, p.stderr)


def listing(folder: Path, before: set[str]) -> str:
    """What a try left in `folder` beyond what was there before it (top two levels)."""
    now = {str(p.relative_to(folder)) for p in folder.glob("*")} | {
        str(p.relative_to(folder)) for p in folder.glob("*/*")}
    new = sorted(now - before)
    return ", ".join(new[:8]) + (" ..." if len(new) > 8 else "") if new else "nothing"


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.glob("*")} | {
        str(p.relative_to(folder)) for p in folder.glob("*/*")}


def cli_row(area: str, shown: str, args: list[str], cwd: Path, expected: str, ok: Callable[[Result], bool],
            **extra: str) -> Row:
    before = snapshot(cwd)
    r = run(args, cwd, **extra)
    row = Row(area, shown, expected, r.last_line(), r.code, "Traceback" in r.err, listing(cwd, before))
    row.held = ok(r) and not row.traceback
    return row


def write_params(path: Path, **dotted: object) -> Path:
    """A preset over the repository's params.yaml: only the keys given differ."""
    tree: dict[str, object] = {"extends": str(ROOT / "params.yaml")}
    for key, value in dotted.items():
        node = tree
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[last] = value
    path.write_text(json.dumps(tree, indent=1))  # JSON is YAML 1.2 and 1.1 alike: no typing surprises
    return path


def synthetic(root: Path, classes: int = 3, train: int = 8, val: int = 2) -> Path:
    from pipeline.data.synthetic import generate_synthetic_imagenet

    generate_synthetic_imagenet(root, num_classes=classes, train_per_class=train, val_per_class=val,
                                image_size=32, seed=0)
    return root


def imagefolder(root: Path, classes: int, per_class: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
    return root


def descendants(pid: int) -> set[int]:
    """Every live (not zombie) process below `pid`, from /proc (Linux)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def tree_sha(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and not rel.startswith(".done") and not rel.endswith((".lock", ".plan.json")):
            h.update(rel.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------- the tries


def one_line_errors(work: Path, params: Path, model: Path | None) -> list[Row]:
    rows = []
    rows.append(cli_row("one-line errors", "`stages.train --set 'train.lr=[0.1'`",
                        [PY, "-m", "stages.train", "--arch", "resnet18", "--params", str(params),
                         "--set", "train.lr=[0.1"], work, "exit 2, names train.lr",
                        lambda r: r.code == 2 and "train.lr" in r.last_line()))
    rows.append(cli_row("one-line errors", "`stages.train --arch resnet19`",
                        [PY, "-m", "stages.train", "--arch", "resnet19", "--params", str(params)], work,
                        "exit 2, lists the choices", lambda r: r.code == 2 and "resnet18" in r.last_line()))
    empty = work / "arch19"
    empty.mkdir()
    rows.append(cli_row("one-line errors", "`pipeline train --arch resnet19 --data DIR`",
                        [PY, "-m", "pipeline", "train", "--arch", "resnet19", "--data", str(work / "raw"),
                         "--params", str(params)], empty, "exit 2 before shards, Ray or an MLflow run",
                        lambda r: r.code == 2 and "resnet19" in r.last_line() and not any(empty.iterdir())))
    for flag in ("--epochs", "--lr", "--batch-size"):
        rows.append(cli_row("no silent no-op", f"`pipeline train {flag} 0`",
                            [PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(work / "raw"),
                             flag, "0", "--params", str(params)], empty, "exit 2 naming the key, nothing written",
                            lambda r: r.code == 2 and not any(empty.iterdir())))
    rows.append(cli_row("one-line errors", "`pipeline predict --model missing/`",
                        [PY, "-m", "pipeline", "predict", "--model", str(work / "missing"), "--image",
                         str(work / "raw")], empty, "exit 1 naming the path, no mlflow.db created",
                        lambda r: r.code == 1 and "missing" in r.last_line() and not any(empty.iterdir())))
    rows.append(cli_row("one-line errors", "`pipeline predict --topk -3`",
                        [PY, "-m", "pipeline", "predict", "--model", str(work / "missing"), "--image",
                         str(work / "raw"), "--topk", "-3"], empty, "exit 2 naming --topk",
                        lambda r: r.code == 2 and "--topk" in r.last_line()))
    if model is not None:
        folder = work / "predict-folder"
        folder.mkdir()
        good = sorted((work / "raw" / "val").rglob("*.jpg"))[:3]
        for g in good:
            shutil.copy(g, folder / g.name)
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        before = snapshot(folder)
        r = run([PY, "-m", "pipeline", "predict", "--model", str(model), "--image", str(folder), "--topk", "1"],
                work)
        answered = sum(1 for g in good if g.name in r.out)
        rows.append(Row("one-line errors", "`pipeline predict` on a folder of 3 good JPEGs + 1 broken",
                        "the 3 answered, the broken one reported, exit 1", r.last_line(), r.code,
                        "Traceback" in r.err, listing(folder, before),
                        held=answered == 3 and "broken.jpg" in (r.out + r.err) and r.code != 0
                        and "Traceback" not in r.err, extra={"answered": answered}))
    return rows


def symlinks(work: Path, params: Path) -> list[Row]:
    rows = []
    loop_raw = imagefolder(work / "loop-raw", 2)
    (loop_raw / "train" / "class0" / "loop").symlink_to("..")
    out = work / "loop-out"
    out.mkdir()
    rows.append(cli_row("symlinks", "a symlink loop in the raw dir (`class0/loop -> ..`)",
                        [PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(loop_raw),
                         "--params", str(params)], out, "one line naming the loop, no shards",
                        lambda r: r.code != 0 and "loop" in r.last_line() and not any(out.iterdir())))
    esc_raw = synthetic(work / "escape-raw", classes=2, train=4, val=1)
    outside = work / "outside.JPEG"
    first = next((esc_raw / "train").rglob("*.JPEG"))
    shutil.copy(first, outside)
    (first.parent / "escape.JPEG").symlink_to(outside)
    out2 = work / "escape-out"
    out2.mkdir()
    rows.append(cli_row("symlinks", "a Kaggle-layout train image symlinked outside the raw dir",
                        [PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(esc_raw),
                         "--params", str(params)], out2, "refused naming the link, not read",
                        lambda r: r.code != 0 and "outside" in r.last_line() and not any(out2.iterdir())))
    return rows


def bomb(work: Path) -> list[Row]:
    """A 13000 x 13000 RGBA PNG (169 Mpx, under Pillow's hard limit): rejected from its header with the default
    budget; peak RSS of the process that meets it, with the budget and with it raised to Pillow's limit (what
    a prepare worker did before the budget existed)."""
    import io

    from PIL import Image

    png = work / "bomb.png"
    buf = io.BytesIO()
    Image.new("RGBA", (13_000, 13_000)).save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    probe = textwrap.dedent("""
        import resource, sys
        from pipeline.data.prepare import RejectedImage, normalize_image
        data = open(sys.argv[1], 'rb').read()
        if sys.argv[2] == 'imports-only':
            print('imports only')
            print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            sys.exit(0)
        try:
            normalize_image(data, max_side=512, jpeg_quality=90, max_pixels=int(sys.argv[2]))
            print('accepted')
        except RejectedImage as exc:
            print('rejected:', exc)
        print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    out = {}
    for label, budget in (("default 50 Mpx budget", 50_000_000), ("budget at Pillow's limit (before)", 178_956_970),
                          ("the same imports, no image", "imports-only")):
        t0 = time.perf_counter()
        r = run([PY, "-c", probe, str(png), str(budget)], work)
        rss = int(r.out.split("maxrss_kb")[-1].strip() or 0) // 1024
        out[label] = (r.out.splitlines()[0] if r.out else r.err[-200:], rss, time.perf_counter() - t0)
    (msg_after, rss_after, s_after), (msg_before, rss_before, s_before), (_, rss_imports, _) = out.values()
    return [Row("decompression bomb", f"a {png.stat().st_size // 1024} KB 13000x13000 RGBA PNG",
                "rejected before decoding: peak RSS that of the imports alone", msg_after[:150], 0, False, "nothing",
                held=msg_after.startswith("rejected") and "169.0 Mpx" in msg_after,
                extra={"peak_rss_mb_imports_only": rss_imports,
                       "peak_rss_mb_with_budget": rss_after, "peak_rss_mb_budget_raised": rss_before,
                       "seconds_with_budget": round(s_after, 2), "seconds_budget_raised": round(s_before, 2),
                       "budget_raised_result": msg_before[:60]})]


def registry_pickle(work: Path) -> list[Row]:
    reg = work / "registry"
    reg.mkdir()
    marker = reg / "PAYLOAD-RAN"
    make = textwrap.dedent(f"""
        import pathlib, mlflow, mlflow.pytorch, torch
        from pipeline import tracking
        class Payload(torch.nn.Module):
            def forward(self, x):
                return x
            def __reduce__(self):
                return pathlib.Path.touch, (pathlib.Path({str(marker)!r}),)
        run_id = tracking.start_run('drill', 'evil', {{}})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(Payload(), name='model', serialization_format='pickle',
                                            pip_requirements=['torch'])
        c = tracking._client()
        c.create_registered_model('evil')
        mv = c.create_model_version('evil', info.model_uri, run_id=run_id, model_id=info.model_id)
        c.set_registered_model_alias('evil', 'champion', mv.version)
    """)
    uri = f"sqlite:///{reg / 'mlflow.db'}"
    made = run([PY, "-c", make], reg, MLFLOW_TRACKING_URI=uri, PIPELINE_RUN_GROUP="drill")
    image = next((work / "raw" / "val").rglob("*.jpg"))
    before = snapshot(reg)
    r = run([PY, "-m", "pipeline", "predict", "--model", "models:/evil@champion", "--image", str(image)], reg,
            MLFLOW_TRACKING_URI=uri)
    return [Row("registry code", "`predict --model models:/evil@champion` (a pickle whose __reduce__ touches a "
                "marker file)", "refused naming the URI, the marker never created", r.last_line(), r.code,
                "Traceback" in r.err, listing(reg, before),
                held=made.code == 0 and r.code != 0 and "evil@champion" in r.last_line() and not marker.exists(),
                extra={"marker_exists": marker.exists(), "registered": made.code == 0})]


def concurrent_prepares(work: Path, raw: Path) -> list[Row]:
    """Two prepares on one shards folder with different rows_per_shard, started together; then a solo run."""
    shards = work / "shared-shards"
    pa = write_params(work / "prep-a.yaml", data__raw_dir=str(raw), data__shards_dir=str(shards),
                      data__rows_per_shard=4, data__workers=1, data__minival_per_class=0)
    pb = write_params(work / "prep-b.yaml", data__raw_dir=str(raw), data__shards_dir=str(shards),
                      data__rows_per_shard=5, data__workers=1, data__minival_per_class=0)
    procs = [subprocess.Popen([PY, "-m", "stages.prepare", "--params", str(p)], cwd=work, env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in (pa, pb)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    losers = [i for i, (code, _, _) in enumerate(results) if code != 0]
    got = tree_sha(shards) if shards.exists() else ""
    solo_dir = work / "solo-shards"
    solo_params = write_params(work / "prep-solo.yaml", data__raw_dir=str(raw), data__shards_dir=str(solo_dir),
                               data__rows_per_shard=4 if winners == [0] else 5, data__workers=1,
                               data__minival_per_class=0)
    run([PY, "-m", "stages.prepare", "--params", str(solo_params)], work)
    solo = tree_sha(solo_dir)
    msg = results[losers[0]][2].strip().splitlines()[-1] if losers else "(both exited 0)"
    return [Row("one writer per output", "two `stages.prepare` on one data.shards_dir (rows_per_shard 4 and 5) "
                "started together", "one refused at once naming the holder; the other's shards equal a solo run's",
                msg, ", ".join(str(c) for c, _, _ in results), any("Traceback" in e for _, _, e in results),
                f"sha256 of manifest+shards: shared {got[:12]}, solo {solo[:12]}",
                held=len(winners) == 1 and len(losers) == 1 and "pid" in msg and got == solo,
                extra={"shared_sha256": got, "solo_sha256": solo})]


def concurrent_trains(work: Path, shards: Path) -> list[Row]:
    out = work / "train-out"
    p = write_params(work / "train.yaml", data__shards_dir=str(shards), train__num_workers=0, train__epochs=1,
                     train__use_tuned=False, train__batch_size=8, train__storage_path=str(work / "ray"))
    args = [PY, "-m", "stages.train", "--arch", "resnet18", "--params", str(p), "--out", str(out / "model"),
            "--metrics", str(out / "m.json"), "--curve", str(out / "c.csv")]
    first = subprocess.Popen(args, cwd=work, env=env(MLFLOW_TRACKING_URI=f"sqlite:///{work / 'train-mlflow.db'}"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    from pipeline.runtime import lock_file

    deadline = time.monotonic() + 120
    while not lock_file(out / "model").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    second = run(args, work, MLFLOW_TRACKING_URI=f"sqlite:///{work / 'train-mlflow.db'}")
    code1 = first.wait(timeout=900)
    _, err1 = first.communicate()
    return [Row("one writer per output", "two `stages.train` with the same params and --out, the second started "
                "while the first trains", "the second refused at once naming the holder; the first finishes",
                second.last_line(), f"{code1}, {second.code}", "Traceback" in second.err,
                "the first's model/, metrics, curve",
                held=code1 == 0 and second.code != 0 and "pid" in second.last_line(),
                extra={"first_stderr_tail": err1.strip().splitlines()[-1:] if err1 else []})]


def killed_prepare(work: Path) -> list[Row]:
    raw = synthetic(work / "kill-raw", classes=4, train=60, val=4)
    shards = work / "kill-shards"
    p = write_params(work / "kill.yaml", data__raw_dir=str(raw), data__shards_dir=str(shards),
                     data__rows_per_shard=8, data__workers=2, data__minival_per_class=0)
    proc = subprocess.Popen([PY, "-m", "stages.prepare", "--params", str(p)], cwd=work, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((shards / "train").glob("*.parquet"))) < 3:
        time.sleep(0.05)
    children = descendants(proc.pid)  # the fork server, the resource tracker, the pool workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    alive = {c for c in children if Path(f"/proc/{c}").exists()
             and Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
    left_tmp = sorted(q.name for q in shards.rglob("*.tmp"))
    r = run([PY, "-m", "stages.prepare", "--params", str(p)], work)
    after_tmp = sorted(q.name for q in shards.rglob("*.tmp"))
    solo = work / "kill-solo"
    ps = write_params(work / "kill-solo.yaml", data__raw_dir=str(raw), data__shards_dir=str(solo),
                      data__rows_per_shard=8, data__workers=2, data__minival_per_class=0)
    run([PY, "-m", "stages.prepare", "--params", str(ps)], work)
    same = tree_sha(shards) == tree_sha(solo)
    return [Row("killed runs", "kill -9 of `stages.prepare` (2 workers) midway, then rerun",
                "workers end with their parent; the rerun resumes, leaves no .tmp, equals a solo run",
                f"processes below it alive 3 s after the kill: {len(alive)} of {len(children)}; rerun exit {r.code}",
                r.code,
                "Traceback" in r.err, f".tmp before rerun: {len(left_tmp)}, after: {len(after_tmp)}",
                held=not alive and r.code == 0 and not after_tmp and same, extra={"equal_to_solo": same})]


def secrets(work: Path) -> list[Row]:
    rows = []
    copy = work / "repo-copy"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(work / "repo.tar"), "HEAD"],
                   check=True)
    copy.mkdir()
    subprocess.run(["tar", "-xf", str(work / "repo.tar"), "-C", str(copy)], check=True)
    # `--no-such-flag`: real dvc refuses it at once, after the entrypoint has logged its environment.
    r = run(["bash", "infra/ray/entrypoint.sh", "--no-such-flag"], copy,
            MLFLOW_TRACKING_URI="postgresql://bob:hunter2@db:5432/mlflow", RAY_ADDRESS="")
    log = r.out + r.err
    rows.append(Row("secrets", "entrypoint with MLFLOW_TRACKING_URI=postgresql://bob:hunter2@db/...",
                    "the log shows ***@db, never the password",
                    next((ln for ln in log.splitlines() if "MLflow:" in ln), "(no MLflow line)"), r.code, False,
                    "the copy's .dvc/config.local", held="hunter2" not in log and "***@db" in log))
    home = work / "home"
    home.mkdir()
    g = run(["bash", "-c", "(umask 077 && ray get-auth-token --generate >/dev/null) && chmod 600 ~/.ray/auth_token"
             " && stat -c %a ~/.ray/auth_token"], work, HOME=str(home))
    mode = g.out.strip().splitlines()[-1] if g.out.strip() else g.err.strip()[-100:]
    rows.append(Row("secrets", "the documented local token commands (docs/cluster.md)", "token file mode 600",
                    f"mode {mode}", g.code, "Traceback" in g.err, "~/.ray/auth_token", held=mode == "600"))
    return rows


def trained_model(work: Path, params: Path) -> tuple[Path | None, Row]:
    """A real one-epoch model through `pipeline train` (for predict), and the refusals of no-op training."""
    out = work / "run1"
    r = run([PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(work / "raw"), "--epochs", "1",
             "--params", str(params), "--out", str(out)], work,
            MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}")
    model = out / "model"
    return (model if r.code == 0 and model.is_dir() else None,
            Row("baseline", "`pipeline train --data DIR --epochs 1` on an ordinary 3-class folder", "trains, exit 0",
                r.last_line()[:120], r.code, "Traceback" in r.err, "run1/", held=r.code == 0))


def no_op_training(work: Path) -> list[Row]:
    rows = []
    one = imagefolder(work / "one-class", 1)
    out = work / "one-out"
    out.mkdir()
    p = write_params(work / "nop.yaml", train__num_workers=0, train__use_tuned=False, train__batch_size=8,
                     train__storage_path=str(work / "ray"))
    rows.append(cli_row("no silent no-op", "`pipeline train --data` a one-class folder",
                        [PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(one), "--params", str(p),
                         "--out", str(out / "run")], out, "refused before training: fewer than 2 classes",
                        lambda r: r.code != 0 and "class" in r.last_line(),
                        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'nop-mlflow.db'}"))
    out2 = work / "big-out"
    out2.mkdir()
    rows.append(cli_row("no silent no-op", "`pipeline train --batch-size 4096` on 24 images",
                        [PY, "-m", "pipeline", "train", "--arch", "resnet18", "--data", str(work / "raw"),
                         "--batch-size", "4096", "--params", str(p), "--out", str(out2 / "run")], out2,
                        "refused before training, naming train.batch_size",
                        lambda r: r.code != 0 and "batch_size" in r.last_line(),
                        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'nop-mlflow.db'}"))
    return rows


def markdown(rows: list[Row], seconds: float) -> str:
    def cell(s: object) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")[:220]

    lines = [
        "# Hostile and careless input: the drill", "",
        f"`python -m bench.hostile_input` on {socket.gethostname()} ({os.cpu_count()} cores), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {seconds:.0f} s. Each try is a fresh process in a "
        "fresh folder; `left` is what the try added to its folder.", "",
        "| area | input | expected | last line printed | exit | traceback | left | held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(cell(x) for x in (r.area, r.input, r.expected, r.message, r.exit_code,
                                                          "yes" if r.traceback else "no", r.left,
                                                          "yes" if r.held else "**NO**")) + " |")
    extras = [(r.input, r.extra) for r in rows if r.extra]
    if extras:
        lines += ["", "Figures:", ""] + [f"- {cell(i)}: `{json.dumps(e)}`" for i, e in extras]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile_input", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/hostile_input.md", help="the markdown table (and a .json beside)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        work = Path(tmp)
        imagefolder(work / "raw", 3, per_class=8)
        params = write_params(work / "params.yaml", train__num_workers=0, train__use_tuned=False,
                              train__batch_size=8, train__storage_path=str(work / "ray"))
        steps: list[Callable[[], list[Row]]] = []
        model: list[Path | None] = [None]

        def baseline() -> list[Row]:
            m, row = trained_model(work, params)
            model[0] = m
            return [row]

        steps += [baseline, lambda: one_line_errors(work, params, model[0]), lambda: symlinks(work, params),
                  lambda: no_op_training(work), lambda: bomb(work), lambda: registry_pickle(work),
                  lambda: concurrent_prepares(work, synthetic(work / "prep-raw", classes=3, train=12, val=2)),
                  lambda: concurrent_trains(work, work / "shared-shards"), lambda: killed_prepare(work),
                  lambda: secrets(work)]
        for step in steps:
            try:
                rows += step()
            except Exception as exc:  # a broken try is a row that did not hold, not the end of the drill
                rows.append(Row("drill", getattr(step, "__name__", "step"), "runs",
                                f"{type(exc).__name__}: {exc}", "", True, "", held=False))
            print(f"[drill] {len(rows)} rows, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    text = markdown(rows, time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps([r.__dict__ for r in rows], indent=1, default=str))
    print(text)
    return 0 if all(r.held for r in rows) else 1


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
