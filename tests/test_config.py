"""params.yaml schema: unknown keys and out-of-bound values fail with the key and the file named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import Params, ParamsError, load_params, parse_override, with_absolute_paths

ROOT = Path(__file__).resolve().parent.parent


def test_default_params_file_validates() -> None:
    p = load_params(ROOT / "params.yaml")
    assert p.data.source == "synthetic"
    assert p.model.archs == ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert len(p.digest()) == 16


def test_every_preset_validates() -> None:
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets, "configs/ must hold at least one preset"
    for preset in presets:
        load_params(preset)


def test_override_parses_yaml_values() -> None:
    assert parse_override("train.lr=0.05") == ("train.lr", 0.05)
    assert parse_override("model.archs=[resnet18]") == ("model.archs", ["resnet18"])
    assert parse_override("data.first_n_classes=null") == ("data.first_n_classes", None)
    with pytest.raises(ParamsError, match="KEY=VALUE"):
        parse_override("train.lr")


def test_set_applies_and_validates() -> None:
    p = load_params(ROOT / "params.yaml", ["train.lr=0.3", "tune.num_samples=2"])
    assert p.train.lr == 0.3 and p.tune.num_samples == 2
    assert load_params(ROOT / "params.yaml").eval.precision == "fp32"  # one precision for every row, by default
    assert load_params(ROOT / "params.yaml", ["eval.precision=bf16"]).eval.precision == "bf16"


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lrr=0.1", "train.lrr"),  # typo: unknown key
        ("train.lr=-1", "train.lr"),  # out of bounds
        ("bogus.x=1", "bogus"),  # unknown section
        ("model.archs=[resnet19]", "model.archs"),  # unknown arch
        ("train.amp=fp8", "train.amp"),
        ("eval.precision=none", "eval.precision"),  # eval.precision spells fp32 as fp32 (train.amp: none)
    ],
)
def test_bad_override_names_key_and_file(override: str, key: str) -> None:
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert key in str(err.value)
    assert "params.yaml" in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="bad.yaml"):
        load_params(bad)


def test_cross_field_rules() -> None:
    with pytest.raises(ParamsError, match="val_crop_size"):
        load_params(ROOT / "params.yaml", ["train.val_crop_size=64", "train.val_resize_size=32"])
    with pytest.raises(ParamsError, match="lr_per_256_low must be < tune.lr_per_256_high"):
        load_params(ROOT / "params.yaml", ["tune.lr_per_256_low=1", "tune.lr_per_256_high=0.1"])


@pytest.mark.parametrize(("override", "key"), [
    ("train.storage_path=s3://my-bucket/resnet-pipeline/checkpoints", "train.storage_path"),
    ("train.storage_path=s3://YOUR-BUCKET/resnet-pipeline/checkpoints", "train.storage_path"),  # docs/cluster.md
    ("train.storage_path=s3:///checkpoints", "train.storage_path"),
    ("train.storage_path=gs://<bucket>/ckpt", "train.storage_path"),
    ("data.shards_dir=s3://example/shards", "data.shards_dir"),
    ("data.shards_dir=https://data.example.com/shards", "data.shards_dir"),
    ("data.raw_dir=s3://your_bucket/imagenet", "data.raw_dir"),
])
def test_placeholder_storage_is_refused_when_params_load(override: str, key: str) -> None:
    """A placeholder bucket would start the run and fail at its first checkpoint (or shard write) after start-up:
    refused at load, in one line naming the key and the value, saying what to put there."""
    value = override.partition("=")[2]
    with pytest.raises(ParamsError) as exc:
        load_params(ROOT / "params.yaml", [override])
    msg = str(exc.value)
    assert "\n" not in msg and f"{key}: " in msg and repr(value) in msg and "placeholder" in msg
    assert "set it to" in msg


def test_placeholder_check_keeps_real_locations_and_masks_credentials() -> None:
    for override in ("train.storage_path=s3://bucket/ckpt", "train.storage_path=file:///tmp/ckpt",
                     "train.storage_path=ray_results", "data.shards_dir=s3://acme-ml/shards",
                     "data.raw_dir=/datasets/imagenet"):
        load_params(ROOT / "params.yaml", [override])
    with pytest.raises(ParamsError, match=r"s3://\*\*\*@my-bucket/x") as exc:
        load_params(ROOT / "params.yaml", ["train.storage_path=s3://AKIA:SECRET@my-bucket/x"])
    assert "SECRET" not in str(exc.value)


def test_decode_auto_choice() -> None:
    """train.decode auto: nvJPEG on the GPU workers (`worker`) below the CPUs per GPU the CPU path needs to feed a
    GPU, derived from the measured CPU decode cost; `tasks` otherwise, on CPU-only workers and with a recipe key
    the worker path does not apply. An explicit value is kept."""
    from pipeline.config import CPU_DECODE_MS_PER_IMAGE, DECODE_CPUS_PER_GPU, GPU_IMAGES_PER_S, choose_decode

    assert DECODE_CPUS_PER_GPU == 10  # 3,000 img/s x (2.229 + 0.89) ms of a core an image = 9.4 cores
    assert DECODE_CPUS_PER_GPU - 1 < GPU_IMAGES_PER_S * CPU_DECODE_MS_PER_IMAGE / 1000 <= DECODE_CPUS_PER_GPU
    # A 16-core, 8-GPU node at 1 CPU per worker: 1 CPU per GPU left for decoding (~320 img/s) -> worker.
    choice, why = choose_decode("auto", use_gpu=True, decode_cpus_per_gpu=1.0)
    assert choice == "worker" and "\n" not in why and "10 needed" in why
    assert choose_decode("auto", use_gpu=True, decode_cpus_per_gpu=DECODE_CPUS_PER_GPU - 0.5)[0] == "worker"
    assert choose_decode("auto", use_gpu=True, decode_cpus_per_gpu=DECODE_CPUS_PER_GPU)[0] == "tasks"
    assert choose_decode("auto", use_gpu=True, decode_cpus_per_gpu=22.0)[0] == "tasks"
    assert choose_decode("auto", use_gpu=False, decode_cpus_per_gpu=0.5)[0] == "tasks"  # CPU-only
    choice, why = choose_decode("auto", use_gpu=True, decode_cpus_per_gpu=1.0, blockers=["train.pca_lighting"])
    assert choice == "tasks" and "train.pca_lighting" in why
    for fixed in ("tasks", "worker"):
        assert choose_decode(fixed, use_gpu=True, decode_cpus_per_gpu=1.0)[0] == fixed
        assert choose_decode(fixed, use_gpu=False, decode_cpus_per_gpu=64.0)[0] == fixed
    # auto passes the schema with the recipe keys worker refuses (it falls back to tasks); worker still refuses.
    load_params(ROOT / "configs" / "paper.yaml", ["train.decode=auto"])
    with pytest.raises(ParamsError, match="train.decode: worker does not apply train.pca_lighting"):
        load_params(ROOT / "configs" / "paper.yaml", ["train.decode=worker"])


def test_absolute_paths_leave_uris_alone(tmp_path: Path) -> None:
    p = Params().model_copy()
    p = p.model_copy(update={"train": p.train.model_copy(update={"storage_path": "s3://bucket/ckpt"})})
    q = with_absolute_paths(p, tmp_path)
    assert q.train.storage_path == "s3://bucket/ckpt"
    assert Path(q.data.shards_dir).is_absolute() and q.data.shards_dir.startswith(str(tmp_path.resolve()))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--params", str(ROOT / "params.yaml"), "--set", "train.lrr=0.1"], "train.lrr"),
        (["--params", "missing.yaml"], "missing.yaml"),
    ],
)
@pytest.mark.subprocess
def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "stages.prepare", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.subprocess
def test_empty_raw_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    params = tmp_path / "p.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "stages.prepare", "--params", str(params), "--set", "data.source=auto",
         "--set", f"data.raw_dir={tmp_path / 'raw'}", "--set", f"data.shards_dir={tmp_path / 'shards'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "raw" in lines[0] and lines[0].startswith("error:"), out.stderr
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_arch_table_is_the_model_registry() -> None:
    """params validation and the lr transfer rule know each network without importing model code (pipeline.archs)."""
    from pipeline.archs import ARCHS
    from pipeline.models import MODELS, model_info

    assert tuple(sorted(ARCHS)) == MODELS
    for name, (family, block, layers) in ARCHS.items():
        info = model_info(name)
        assert (info["family"], info["block"], info["layers"]) == (family, block, layers), name


def test_parameters_doc_is_the_schema() -> None:
    """docs/parameters.md is exactly what the schema generates, and every field explains itself."""
    from pathlib import Path

    from pipeline.config import parameters_markdown, undocumented_fields

    page = Path(__file__).resolve().parents[1] / "docs" / "parameters.md"
    assert page.read_text() == parameters_markdown(), "docs/parameters.md is stale: run `make docs`"
    assert undocumented_fields() == [], "give these fields a Field(description=...)"
