"""`make gpu-check`'s CPU plumbing mode, end to end in subprocesses (what CI and a laptop run; the GPU run is the
same code at other sizes): it exits 0, writes every record in bench.common's shape, says that nothing was
measured on a GPU, drives run_loop through a forced single-rank gloo group, trains the compiled DDP model there,
imports neither ray, mlflow nor dvc (nor anything else the GPU acceptance machine lacks); a failing section (or a
missing pyarrow, or a crash before the first section) still leaves a report and a non-zero exit; the time budget
skips sections with exit 3; the Makefile target reaches the script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bench.common import RECORD_KEYS
from bench.gpu_check import DDP_RECORD, DEPENDENCIES, FORBIDDEN_IMPORTS, HANG_ENV, INJECT_ENV, RefuseImports

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.subprocess  # every test here runs the check as a process, make or a script

# Runs the check as `python -m bench.gpu_check` would, recording for every top-level module the file that first
# imported it (the check's own guard sees only the refused ones); then writes {module: importer}.
BOOTSTRAP = r"""
import importlib.abc, json, runpy, sys

importers = {}

class Attribute(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top not in importers and top not in sys.modules:
            frame = sys._getframe(1)
            while frame and ("importlib" in frame.f_code.co_filename or frame.f_code.co_filename == __file__):
                frame = frame.f_back
            importers[top] = frame.f_code.co_filename if frame else "?"
        return None

__file__ = "<bootstrap>"
sys.meta_path.insert(0, Attribute())
modules_out = sys.argv[1]
sys.argv = ["bench.gpu_check", *sys.argv[2:]]
code = 0
try:
    runpy.run_module("bench.gpu_check", run_name="__main__", alter_sys=True)
except SystemExit as exc:
    code = exc.code
loaded = {m.partition(".")[0] for m in sys.modules}
with open(modules_out, "w") as fh:
    json.dump({m: importers.get(m, "?") for m in sorted(loaded)}, fh)
sys.exit(code)
"""
CPU_RECORDS = {
    "train_synthetic_bf16_vs_fp16", "run_loop_bf16_vs_synthetic", "run_loop_fp16_vs_synthetic",
    "cpu_decode_pool_vs_synthetic", "train_cpu_decode_vs_synthetic", "eval_val_shard_vs_core",
    "train_compiled_vs_eager_bf16", DDP_RECORD,
}
# What the GPU acceptance machine has: these distributions and whatever they require (torch's CUDA wheels,
# sympy, jinja2, ...), plus the wheels bench/fetch_gpu_wheels.sh carries.
GPU_MACHINE_DISTS = {"torch", "torchvision", "numpy", "pillow", "pyarrow", "pyyaml"}
CARRIED_WHEELS = {"pydantic", "pydantic-core", "annotated-types", "typing-extensions", "typing-inspection", "tqdm"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(dists: set[str]) -> set[str]:
    """The distributions and their non-extra requirements, transitively (installed ones only)."""
    seen: set[str] = set()
    todo = [_norm(d) for d in dists]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in requires:
            if "extra ==" in req:
                continue
            todo.append(_norm(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def _run_check(tmp_path: Path, *args: str, env_extra: dict[str, str] | None = None) -> tuple[int, str, list, list]:
    out, modules = tmp_path / "gpu_check.json", tmp_path / "modules.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}  # a GPU, if any, stays unused
    env.pop(INJECT_ENV, None)
    env.pop(HANG_ENV, None)
    env.update(env_extra or {})
    proc = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, str(modules), "--out", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    text = proc.stdout + proc.stderr
    records = json.loads(out.read_text()) if out.is_file() else []
    loaded = json.loads(modules.read_text()) if modules.is_file() else []
    return proc.returncode, text, records, loaded


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, list, list]:
    return _run_check(tmp_path_factory.mktemp("gpu_check"))


def test_cpu_mode_exits_0_and_says_nothing_was_measured_on_a_gpu(cpu_run) -> None:
    code, text, records, _ = cpu_run
    assert code == 0, text[-4000:]
    assert "nothing was measured on a GPU" in text
    assert "NO GPU" in text  # the summary's first line
    names = {r["name"] for r in records}
    assert names == CPU_RECORDS, (sorted(names), text[-3000:])
    assert not any(n.startswith("gpu_decode") for n in names)  # no nvJPEG without a GPU: no record
    assert "gpu_decode: not measured" in text
    for r in records:
        assert list(r)[: len(RECORD_KEYS)] == list(RECORD_KEYS), r["name"]
        assert r["status"] == "ok" and r["error"] is None, r
        assert r["gpu"] is None and r["measured_on_gpu"] is False and r["mode"] == "cpu-plumbing", r["name"]
        assert "GPU: none" in r["machine"] and "NOTHING measured on a GPU" in r["machine"], r["machine"]
        assert r["value"] > 0 and r["baseline_value"] > 0 and r["n_runs"] >= 1, r
        assert r["ratio"] == pytest.approx(r["value"] / r["baseline_value"], rel=0.01), r
        lo, hi = r["spread"]
        assert lo <= hi, r
        assert r["refused_imports"] == [], r


def test_run_loop_went_through_a_forced_single_rank_gloo_group(cpu_run) -> None:
    _, text, records, _ = cpu_run
    by_name = {r["name"]: r for r in records}
    for name, epochs in (("run_loop_bf16_vs_synthetic", 2), ("run_loop_fp16_vs_synthetic", 1)):
        r = by_name[name]
        assert r["backend"] == "gloo" and r["world_size"] == 1, r
        assert r["collective_calls"] > 0 and r["collective_devices"] == ["cpu"], r
        assert r["collectives_forced"] == "pipeline.training.dist.set_force_collectives(True)", r
        assert r["val_source"] == "InMemoryValShard", r
        assert r["baseline_found"] is True, r  # the synthetic section ran first and gave the bound
        assert [h["epoch"] for h in r["history"]] == list(range(1, epochs + 1)), r["history"]
        # Every val image exactly once per epoch (20 = 5 classes x 4 in the CPU check).
        assert all(h["val_images"] == r["n_val"] == 20 for h in r["history"]), r["history"]
    assert by_name["run_loop_fp16_vs_synthetic"]["amp"] == "fp16"


def test_ddp_section_trains_the_compiled_ddp_model_in_a_one_rank_gloo_group(cpu_run) -> None:
    """The CPU side of the NCCL/DDP section: a real one-rank gloo group, DDP (whose gradient buckets went through
    it), torch.compile around the DDP module, the loop's own collectives, every tensor on the training device;
    SyncBatchNorm said to be skipped on CPU (torch refuses it there), not silently left out."""
    _, text, records, _ = cpu_run
    r = {r["name"]: r for r in records}[DDP_RECORD]
    assert r["status"] == "ok" and r["section"] == "ddp", r
    assert r["backend"] == "gloo" and r["world_size"] == 1 and r["init_method"].startswith("tcp://127.0.0.1"), r
    assert r["ddp"].startswith("torch.nn.parallel.DistributedDataParallel(model, device_ids=None)"), r
    assert r["compile"].startswith("torch.compile(<the DDP module>, backend='eager')"), r
    assert r["sync_bn"].startswith("skipped on CPU") and r["sync_bn_layers"] == 0, r
    assert r["ddp_bucket_allreduces"] > 0 and r["ddp_bucket_devices"] == ["cpu"], r
    assert r["loop_collectives"] == ["sum_tensor", "sum_across", "max_across", "all_gather_objects"], r
    assert r["loop_collective_calls"] >= 4 and r["collective_devices"] == ["cpu"], r
    checked = r["devices_checked"]
    assert checked["training_device"] == "cpu" and r["off_device"] == [], r
    assert checked["parameters"] == checked["grads"] == checked["optimizer_state"] > 0 < checked["buffers"], r
    assert r["first_step_s"] > 0 and r["baseline_found"] is True, r


def test_eval_counts_and_decode_records(cpu_run) -> None:
    _, _, records, _ = cpu_run
    by_name = {r["name"]: r for r in records}
    ev = by_name["eval_val_shard_vs_core"]
    assert ev["n_val"] == 20 and 0 <= ev["top1_correct"] <= ev["top5_correct"] <= 20, ev
    # The batch the record names is the batch it measured: the 20 val images are in shards of 8 rows.
    assert ev["eval_batch"] == 8 and ev["batch_rows"] == [8, 8, 4], ev
    assert ev["val_shard_counts"][2] == 20, ev
    dec = by_name["cpu_decode_pool_vs_synthetic"]
    assert dec["workers"] >= 1 and dec["images_per_pass"] % dec["chunk"] == 0, dec
    comp = by_name["train_compiled_vs_eager_bf16"]
    assert comp["compile_backend"] == "eager" and comp["first_step_s"] > 0, comp


def test_imports_only_what_the_gpu_machine_has(cpu_run) -> None:
    """Our code (bench/, pipeline/) imports only distributions the GPU machine has; optional imports inside
    torch or pyarrow (pandas, pydot, colorama, ... when installed) are theirs to skip where absent."""
    _, _, _, loaded = cpu_run
    assert loaded, "the bootstrap wrote no module list"
    assert not [m for m in loaded if m in FORBIDDEN_IMPORTS], sorted(loaded)
    allowed = _closure(GPU_MACHINE_DISTS) | {_norm(d) for d in CARRIED_WHEELS}
    dists_of = metadata.packages_distributions()
    unexpected = {}
    for top, importer in loaded.items():
        ours = importer.startswith(str(ROOT)) and "site-packages" not in importer
        if not ours or top in sys.stdlib_module_names or top in {"bench", "pipeline"}:
            continue
        dists = {_norm(d) for d in dists_of.get(top, [top])}
        if not dists & allowed:
            unexpected[top] = importer
    assert not unexpected, f"imported by our code, but not on the GPU acceptance machine: {unexpected}"


def test_a_failing_section_keeps_the_others_and_exits_1(tmp_path: Path) -> None:
    code, text, records, _ = _run_check(tmp_path, "--sections", "synthetic,eval", env_extra={INJECT_ENV: "eval"})
    assert code == 1, text[-3000:]
    by_name = {r["name"]: r for r in records}
    assert by_name["train_synthetic_bf16_vs_fp16"]["status"] == "ok"
    failed = by_name["gpu_check_eval"]
    assert failed["status"] == "error" and "injected" in failed["error"], failed
    assert set(RECORD_KEYS) <= set(failed) and failed["value"] is None and failed["measured_on_gpu"] is False
    assert "gpu_check_eval: ERROR" in text


def test_a_missing_pyarrow_is_recorded_and_the_report_still_written(tmp_path: Path) -> None:
    """pyarrow made unimportable (a package on PYTHONPATH that raises as an absent one would): the dependency
    check and the section that reads shards record it, the sections that need no shards still run, the report
    is written and the exit code says something failed."""
    stub = tmp_path / "no_pyarrow" / "pyarrow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text('raise ModuleNotFoundError("No module named \'pyarrow\'", name="pyarrow")\n')
    pythonpath = os.pathsep.join([str(stub.parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    code, text, records, _ = _run_check(tmp_path, "--sections", "synthetic,eval",
                                        env_extra={"PYTHONPATH": pythonpath})
    assert code == 1, text[-3000:]
    by_name = {r["name"]: r for r in records}
    assert set(by_name) == {"gpu_check_dependencies", "train_synthetic_bf16_vs_fp16", "gpu_check_eval"}, text[-3000:]
    deps = by_name["gpu_check_dependencies"]
    assert deps["status"] == "error" and deps["missing"] == ["pyarrow", "pyarrow.parquet"], deps
    assert "pyarrow" in by_name["gpu_check_eval"]["error"], by_name["gpu_check_eval"]
    assert by_name["train_synthetic_bf16_vs_fp16"]["status"] == "ok"
    for r in records:
        assert list(r)[: len(RECORD_KEYS)] == list(RECORD_KEYS), r["name"]


def test_a_crash_before_the_first_section_still_writes_the_report(tmp_path: Path) -> None:
    code, text, records, _ = _run_check(tmp_path, "--sections", "synthetic", env_extra={INJECT_ENV: "start"})
    assert code == 1, text[-3000:]
    assert [(r["name"], r["status"]) for r in records] == [("gpu_check_start", "error")], text[-3000:]
    assert "injected" in records[0]["error"] and records[0]["measured_on_gpu"] is False, records
    assert list(records[0])[: len(RECORD_KEYS)] == list(RECORD_KEYS)
    assert "FAILED before the first section" in text


def test_the_dependency_checks_list_pyarrow() -> None:
    """Both checks, the script's (before it starts Python on the check) and the check's own."""
    needed = re.search(r'^NEEDED="([^"]*)"', (ROOT / "bench" / "gpu_check.sh").read_text(), re.M)
    assert needed, "bench/gpu_check.sh has no NEEDED line"
    imported = {m.strip() for m in needed.group(1).split(";")[0].removeprefix("import ").split(",")}
    assert {"pyarrow", "pyarrow.parquet", "pydantic", "yaml", "tqdm"} <= imported, imported
    assert {"pyarrow", "pyarrow.parquet", "torch", "torchvision", "numpy", "PIL"} <= set(DEPENDENCIES)


def test_the_time_budget_skips_sections_with_exit_3(tmp_path: Path) -> None:
    code, text, records, _ = _run_check(tmp_path, "--sections", "synthetic", "--budget-s", "0.001",
                                        "--hard-limit-s", "300")
    assert code == 3, text[-3000:]
    assert [(r["name"], r["status"]) for r in records] == [("gpu_check_synthetic", "skipped")]
    assert "time budget" in records[0]["error"]


def test_the_watchdog_stops_a_run_past_the_hard_limit_and_keeps_the_records(tmp_path: Path) -> None:
    # The eval section is made to hang (test hook), so the hard limit is reached inside it on any machine.
    code, text, records, _ = _run_check(tmp_path, "--sections", "eval", "--budget-s", "25",
                                        "--hard-limit-s", "30", env_extra={HANG_ENV: "eval"})
    assert code == 1, text[-3000:]
    assert "HARD LIMIT" in text
    stopped = [r for r in records if r["status"] == "error" and "hard limit" in r["error"]]
    assert len(stopped) == 1 and stopped[0]["name"].startswith("gpu_check_"), records


def test_the_import_guard_refuses_and_remembers() -> None:
    guard = RefuseImports()
    with pytest.raises(ModuleNotFoundError, match="refused"):
        guard.find_spec("ray.train")
    with pytest.raises(ModuleNotFoundError):
        guard.find_spec("mlflow")
    assert guard.find_spec("rayon") is None and guard.find_spec("dvcx") is None
    assert guard.refused == ["ray.train", "mlflow"]


def test_make_target_runs_the_script_without_setup() -> None:
    proc = subprocess.run(["make", "-s", "gpu-check", "GPU_CHECK_ARGS=--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--sections" in proc.stdout and "--quick" in proc.stdout
    dry = subprocess.run(["make", "-n", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "bench/gpu_check.sh" in dry.stdout and "setup" not in dry.stdout, dry.stdout


def test_carried_wheels_are_the_locked_versions() -> None:
    proc = subprocess.run(["bash", "bench/fetch_gpu_wheels.sh", "--print"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    pins = dict(line.split("==") for line in proc.stdout.split())
    assert set(pins) == {_norm(d) for d in CARRIED_WHEELS}
    for name, version in pins.items():
        assert metadata.version(name) == version, name
    # pydantic pins pydantic-core exactly: the carried pair must be the one pydantic asks for.
    core_pin = next(r for r in metadata.requires("pydantic") or [] if _norm(r).startswith("pydantic-core"))
    assert core_pin.endswith(f"=={pins['pydantic-core']}"), core_pin


def test_decode_chunks_shrink_to_fit_a_small_dev_shm(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import gpu_check

    monkeypatch.setattr(gpu_check, "shm_free", lambda: 64 * 2**20)  # docker's default --shm-size
    chunk = gpu_check.fit_chunk(64, 15, 224)
    assert 1 <= chunk < 64 and 256 % chunk == 0
    assert gpu_check._shm_need(chunk, 15, 224) <= 32 * 2**20 < gpu_check._shm_need(chunk * 2, 15, 224)
    monkeypatch.setattr(gpu_check, "shm_free", lambda: 64 * 2**30)
    assert gpu_check.fit_chunk(64, 15, 224) == 64
