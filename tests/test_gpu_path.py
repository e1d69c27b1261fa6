"""What a GPU cluster would punish, proven on CPU: host syncs and collectives of the loop, exact validation with
padded equal splits, EMA without syncs, the evaluation core shared by the loop and the evaluate stage, sizing
from what is requested.

The 2-worker test runs the real path (train_arch -> TorchTrainer, 2 gloo workers, Ray Data train + val
pipelines) with `PIPELINE_SYNC_PROBE` set: each worker patches torch's value-reading tensor methods and
torch.distributed's Python collectives (pipeline/training/probe.py) and writes what it saw per loop phase.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parent.parent


def test_place_packs_bundles_onto_nodes_and_names_what_is_missing() -> None:
    from pipeline.cluster import describe, missing, place

    head, gpu_node = {"CPU": 2.0}, {"CPU": 16.0, "GPU": 2.0}
    want = [{"CPU": 2, "GPU": 1}, {"CPU": 2, "GPU": 1}, {"CPU": 1}]
    assert place(want, [head]) is None
    assert place(want, [head, gpu_node]) is not None
    assert place(want[:2], [gpu_node]) == [0, 0]
    assert place([{"CPU": 8, "GPU": 1}] * 3, [gpu_node]) is None  # only 2 GPUs
    assert describe(want) == "2 x {CPU: 2, GPU: 1} + 1 x {CPU: 1}"
    assert missing(want, [head]) == "3 more CPU (needs 5, has 2); 2 more GPU (needs 2, has 0)"
    # Enough in total, but no single node holds the shape.
    assert missing([{"CPU": 3}], [{"CPU": 2}, {"CPU": 2}]).startswith("no node can hold 1 x {CPU: 3}")


def test_a_local_cluster_that_cannot_fit_fails_at_once_naming_the_keys() -> None:
    from pipeline.cluster import ResourcesUnavailable, wait_for_resources

    calls = []

    def nodes() -> list[dict[str, float]]:
        calls.append(1)
        return [{"CPU": 2.0}]

    with pytest.raises(ResourcesUnavailable, match=r"needs 1 x \{CPU: 4\}.*cannot grow: 2 more CPU.*Lower train\.x"):
        wait_for_resources([{"CPU": 4}], what="t", keys="train.x", timeout_s=600, can_grow=False, nodes=nodes)
    assert len(calls) == 1, "no waiting on a cluster that cannot grow"


def test_a_growing_cluster_is_waited_for_then_timed_out_naming_what_is_missing(monkeypatch) -> None:
    """The waiting logic without Ray (tests/test_cluster_resources.py runs it on a real two-node cluster)."""
    import ray.autoscaler.sdk

    from pipeline import cluster

    asked = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: asked.append(bundles))
    head, worker = {"CPU": 1.0}, {"CPU": 3.0, "GPU": 1.0}
    seen = iter([[head], [head], [head, worker]])
    got = cluster.wait_for_resources([{"CPU": 2, "GPU": 1}, {"CPU": 1}], what="t", keys="k", timeout_s=60,
                                     poll_s=0.0, can_grow=True, nodes=lambda: next(seen))
    assert got == [head, worker]
    assert asked == [[{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0}]]  # the autoscaler was asked for the shapes
    with pytest.raises(cluster.ResourcesUnavailable,
                       match=r"after waiting 0 s the cluster has 1 node\(s\) and still lacks 1 more CPU .*raise "
                             r"cluster.wait_for_resources_s, or lower k"):
        cluster.wait_for_resources([{"CPU": 2}], what="t", keys="k", timeout_s=0, poll_s=0.0, can_grow=True,
                                   nodes=lambda: [head])


def test_predictor_layout_follows_the_request_not_the_nodes_up_now() -> None:
    from pipeline.evaluation import predictor_layout

    head_only = {"CPU": 4.0}
    # A GPU run on an autoscaling cluster whose GPU nodes are not up yet: GPU actors anyway (they bring the nodes).
    assert predictor_layout(head_only, use_gpu=True, gpus_per_actor=1.0, max_actors=8) == (8, 1.0, 1.0)
    assert predictor_layout({"CPU": 64, "GPU": 8}, use_gpu=False, gpus_per_actor=0.5, max_actors=None) == (16, 1.0, 0.5)
    assert predictor_layout(head_only, use_gpu=False, gpus_per_actor=1.0, max_actors=None) == (2, 1.0, 0.0)
    assert predictor_layout({"CPU": 64, "GPU": 8}, use_gpu=True, gpus_per_actor=0, max_actors=None)[2] == 0.0


def test_ema_matches_torch_averaged_model_and_survives_a_state_round_trip() -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.training.ema import EMA

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ours = EMA(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
        ours.update(model)
        theirs.update_parameters(model)
    for (k, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values(), strict=True):
        if a.is_floating_point():  # torch "averages" the integer num_batches_tracked too; we copy the count
            assert torch.allclose(a, b, atol=1e-6), k
    assert int(ours.module[1].num_batches_tracked) == 5
    again = EMA(model, 0.9)
    again.load_state_dict(ours.state_dict())
    assert again.updates == 5
    assert all(torch.equal(a, b) for a, b in zip(again.module.state_dict().values(),
                                                 ours.module.state_dict().values(), strict=True))


def test_topk_counts_skip_padding_rows_and_stay_on_the_device() -> None:
    from pipeline.metrics import topk_counts

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.0, 1.0]])
    counts = topk_counts(logits, torch.tensor([1, 2, -1]), (1, 2))
    assert isinstance(counts, torch.Tensor) and counts.tolist() == [1, 1]  # the padding row (label -1) never counts


def _odd_val_shards(tmp_path: Path) -> Path:
    """4 classes x 40 train and 9 val images: the val set does not split evenly over 2 ranks."""
    from pipeline.data.prepare import prepare_shards
    from pipeline.data.synthetic import generate_synthetic_imagenet

    generate_synthetic_imagenet(tmp_path / "raw", num_classes=3, train_per_class=54, val_per_class=3,
                                image_size=40, seed=1)
    prepare_shards(tmp_path / "raw", tmp_path / "shards", max_side=64, rows_per_shard=32, workers=1, progress=False)
    return tmp_path / "shards"


@pytest.mark.ray
def test_two_workers_no_host_sync_in_the_step_and_a_fixed_number_of_collectives(tmp_path, monkeypatch) -> None:
    """Also the 2-gloo-worker training test: disjoint train rows, exact val counts over a padded equal split."""
    import ray

    from pipeline.training.loop import DIVERGENCE_CHECK_EVERY
    from pipeline.training.trainer import train_arch

    shards = _odd_val_shards(tmp_path)
    probe_dir = tmp_path / "probe"
    monkeypatch.setenv("PIPELINE_SYNC_PROBE", str(probe_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    if ray.is_initialized():
        ray.shutdown()  # workers must inherit the environment above
    epochs = 2
    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={shards}", f"train.storage_path={tmp_path / 'ckpt'}", f"train.epochs={epochs}",
        "train.epochs_by_arch={}", "train.batch_size=16", "train.use_tuned=false", "train.lr=0.05",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.clip_grad_norm=5", "train.model_ema_decay=0.9",
        "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0",
    ])
    try:
        final = train_arch(p, "resnet18", out_dir=tmp_path / "model", metrics_path=tmp_path / "m.json",
                           curve_path=tmp_path / "c.csv", best_path=None)
    finally:
        ray.shutdown()
    assert final["epochs"] == epochs and final["images_per_s"] > 0
    curve = (tmp_path / "c.csv").read_text().splitlines()
    header = curve[0].split(",")
    val_images = {row.split(",")[header.index("val_images")] for row in curve[1:]}
    assert val_images == {"9"}, "every val image exactly once per validation, none twice, none dropped"

    ranks = [json.loads((probe_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    steps_per_epoch = 162 // 2 // 8
    for blob in ranks:
        assert blob["steps"] == epochs * steps_per_epoch, blob["steps"]
        step_syncs = {k: v for k, v in blob["syncs"].items() if k.startswith("step:")}
        assert step_syncs == {}, f"rank {blob['rank']}: host syncs inside the train step: {step_syncs}"
        # The divergence watch reads its counters every DIVERGENCE_CHECK_EVERY steps (one tolist each).
        polls = epochs * (steps_per_epoch // DIVERGENCE_CHECK_EVERY)
        assert blob["syncs"].get("divergence_watch:tolist", 0) == polls
        trained = [c for c in blob["collectives"] if c["phase"] != "setup"]
        # Per epoch: one all_reduce of the epoch's sums, two all_gathers of the ranks' RNG streams.
        ops = sorted(c["op"] for c in trained)
        assert ops == sorted(["all_reduce"] * epochs + ["all_gather"] * 2 * epochs), trained
        assert all(c["devices"] == ["cpu"] for c in trained), trained  # the training device (CPU here)
        assert {c["phase"] for c in trained} <= {"epoch_end", "checkpoint"}, trained


@pytest.mark.heavy
def test_validation_in_the_loop_gives_the_evaluate_stage_numbers(synthetic_shards, tmp_path) -> None:
    """Both go through `eval_logits` (same decode, normalisation, autocast dtype, EMA weights when on)."""
    from pipeline.evaluation import evaluate_model
    from pipeline.training.checkpoint import export_model_dir, load_train_state
    from pipeline.training.local import InMemoryShard, InProcessSession
    from pipeline.training.loop import run_loop
    from pipeline.training.trainer import make_job

    p = load_params(ROOT / "params.yaml", [
        f"data.shards_dir={synthetic_shards}", "train.epochs=1", "train.batch_size=16", "train.use_tuned=false",
        "train.lr=0.05", "train.lr_warmup_epochs=0", "train.model_ema_decay=0.5", "train.num_workers=0",
    ])
    job = make_job(p, "resnet18", 0.05, 0, 1, None)
    job.checkpoint_dir = str(tmp_path / "ckpt")
    Path(job.checkpoint_dir).mkdir()
    session = InProcessSession(InMemoryShard(job.train_files, crop=32, min_scale=0.35))
    run_loop(job, session)
    export_model_dir(tmp_path / "model", load_train_state(job.checkpoint_dir))
    staged = evaluate_model(str(tmp_path / "model"), str(synthetic_shards), batch_size=7, ray_min_images=10**9)
    loop_val = session.reports[-1]
    assert loop_val["val_images"] == staged["n_images"] == 16
    assert loop_val["val_top1_err"] == pytest.approx(staged["top1_err"], abs=1e-9)
    assert loop_val["val_top5_err"] == pytest.approx(staged["top5_err"], abs=1e-9)


def test_mix_batch_draws_on_the_host_and_keeps_soft_targets_normalised() -> None:
    from pipeline.training.optim import mix_batch

    x = torch.rand(6, 3, 8, 8)
    y = torch.arange(6) % 3
    a, ta = mix_batch(x, y, 3, 0.2, 1.0, np.random.default_rng(5))
    b, tb = mix_batch(x, y, 3, 0.2, 1.0, np.random.default_rng(5))
    assert torch.equal(a, b) and torch.equal(ta, tb)  # the generator's state decides everything
    assert torch.allclose(ta.sum(1), torch.ones(6))


def test_in_memory_val_shard_batches_have_the_rows_asked_for() -> None:
    """The decode yields DECODE_BATCH-row slices; a batch must still hold `batch_size` rows (the gpu-check
    eval record names its batch), not one slice."""
    import numpy as np
    import pyarrow as pa

    from pipeline.training.local import InMemoryValShard

    def slices_of_3(part):
        for s in range(0, len(part["label"]), 3):
            n = len(part["label"][s : s + 3])
            yield {"image": np.zeros((n, 3, 2, 2), np.uint8), "label": part["label"][s : s + 3]}

    shard = InMemoryValShard.__new__(InMemoryValShard)
    shard._decode = slices_of_3
    shard._tables = [pa.table({"image": [b"x"] * 10, "label": list(range(10)), "key": [str(i) for i in range(10)]})]
    sizes = [len(b["label"]) for b in shard.iter_torch_batches(batch_size=8)]
    assert sizes == [8, 2]
    assert [int(v) for b in shard.iter_torch_batches(batch_size=8) for v in b["label"]] == list(range(10))
