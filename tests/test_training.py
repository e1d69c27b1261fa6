"""Training on real Ray Train (TorchTrainer, Train V2) and real Ray Data, on tiny synthetic shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import Params, load_params
from pipeline.training.optim import param_groups

ROOT = Path(__file__).resolve().parent.parent


def tiny_params(shards: Path, storage: Path, **train: object) -> Params:
    sets = [f"data.shards_dir={shards}", f"train.storage_path={storage}", "train.epochs=2", "train.batch_size=16",
            "train.lr_warmup_epochs=0", "train.use_tuned=false", "train.lr=0.05"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_params(ROOT / "params.yaml", sets)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.runtime import init_ray

    init_ray()
    yield
    ray.shutdown()


def test_param_groups_split_by_ndim() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = param_groups(model, weight_decay=1e-4, norm_weight_decay=0.0)
    decay = {id(p) for p in groups[0]["params"]}
    assert decay == {id(model[0].weight), id(model[3].weight)}
    assert groups[0]["weight_decay"] == 1e-4 and groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 4  # conv bias, bn weight, bn bias, fc bias
    assert param_groups(model, 1e-4, None)[1]["weight_decay"] == 1e-4


def test_optimizer_is_fused_exactly_on_cuda(monkeypatch) -> None:
    """Fused SGD/AdamW (no per-step `.item()` in GradScaler.step under fp16) when the parameters are on CUDA; on a
    CPU the optimizer is built exactly as before (torch's defaults). No GPU needed: the device is what
    build_optimizer reads from the parameters, patched here, and fused kernels are only checked at the first step."""
    from pipeline.training import optim

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    for opt in ("sgd", "adamw"):
        tp = Params().train.model_copy(update={"opt": opt})
        cls = torch.optim.SGD if opt == "sgd" else torch.optim.AdamW
        assert optim._params_device_type(model) == "cpu"
        on_cpu = optim.build_optimizer(model, tp, 0.1)
        plain = (torch.optim.SGD(optim.param_groups(model, tp.weight_decay, tp.norm_weight_decay), lr=0.1,
                                 momentum=tp.momentum, nesterov=tp.nesterov) if opt == "sgd" else
                 torch.optim.AdamW(optim.param_groups(model, tp.weight_decay, tp.norm_weight_decay), lr=0.1))
        assert on_cpu.defaults == plain.defaults and not on_cpu.defaults.get("fused")
        assert not on_cpu.defaults.get("foreach")
        with monkeypatch.context() as m:
            m.setattr(optim, "_params_device_type", lambda _model: "cuda")
            on_cuda = optim.build_optimizer(model, tp, 0.1)
        assert on_cuda.defaults["fused"] is True and not on_cuda.defaults.get("foreach")
        assert getattr(on_cuda, "_step_supports_amp_scaling", False)  # what lets GradScaler.step skip .item()
        assert {k: v for k, v in on_cuda.defaults.items() if k != "fused"} == \
            {k: v for k, v in plain.defaults.items() if k != "fused"}
        assert optim.step_kwargs(cls, "cuda") == {"fused": True} and optim.step_kwargs(cls, "cpu") == {}

    # A resumed run steps as its device does, whatever the checkpoint's optimizer did.
    tp = Params().train
    with monkeypatch.context() as m:
        m.setattr(optim, "_params_device_type", lambda _model: "cuda")
        gpu_state = optim.build_optimizer(model, tp, 0.1).state_dict()
    on_cpu = optim.build_optimizer(model, tp, 0.1)
    optim.load_optimizer_state(on_cpu, gpu_state)
    assert not any(g.get("fused") for g in on_cpu.param_groups)
    with monkeypatch.context() as m:
        m.setattr(optim, "_params_device_type", lambda _model: "cuda")
        on_cuda = optim.build_optimizer(model, tp, 0.1)
    optim.load_optimizer_state(on_cuda, on_cpu.state_dict())
    assert all(g["fused"] is True for g in on_cuda.param_groups)

    class ForeachOnly(torch.optim.Optimizer):  # a torch whose optimizer has no fused kernel: foreach on CUDA
        def __init__(self, params, lr=0.1, foreach=None):
            super().__init__(params, {"lr": lr, "foreach": foreach})

    assert optim.step_kwargs(ForeachOnly, "cuda") == {"foreach": True}
    assert optim.step_kwargs(ForeachOnly, "cpu") == {}


def test_resolve_decode_counts_cpus_left_per_gpu_and_prints_the_choice(monkeypatch, capsys) -> None:
    import ray

    from pipeline.training.trainer import resolve_decode

    p = load_params(ROOT / "configs" / "torchvision-v1.yaml")
    assert p.train.decode == "auto" and p.train.use_gpu
    tp = p.train.model_copy(update={"cpus_per_worker": 1.0})
    p = p.model_copy(update={"train": tp})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 8.0})  # 16 cores, 8 GPUs
    assert resolve_decode(p, 8).train.decode == "worker"  # (16 - 8 x 1) / 8 = 1 CPU per GPU left
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[train] train.decode: auto -> worker: 1 CPUs per GPU")
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 192.0, "GPU": 8.0})
    assert resolve_decode(p, 8).train.decode == "tasks"  # 23 CPUs per GPU left
    fixed = p.model_copy(update={"train": tp.model_copy(update={"decode": "tasks"})})
    assert resolve_decode(fixed, 8) is fixed


@pytest.mark.ray
def test_in_process_training_exports_a_self_describing_model(ray_local, synthetic_shards, tmp_path) -> None:
    from pipeline.training.checkpoint import export_model_dir, load_model_dir
    from pipeline.training.trainer import build_trainer, make_job, run

    p = tiny_params(synthetic_shards, tmp_path / "ckpt")
    job = make_job(p, "resnet18", 0.05, 0, p.train.epochs, None)
    outcome = run(build_trainer(job, p, name="inproc", num_workers=0, storage_path=str(tmp_path / "ckpt")))
    assert [h["epoch"] for h in outcome.history] == [1, 2]
    assert outcome.history[-1]["val_images"] == 16  # every val image, once
    assert all(h["train_loss"] > 0 for h in outcome.history)
    out = export_model_dir(tmp_path / "models" / "resnet18", outcome.state)
    model, meta = load_model_dir(out)
    assert meta["arch"] == "resnet18" and meta["num_classes"] == 4 and len(meta["classes"]) == 4
    assert meta["eval_transform"]["crop"] == p.train.val_crop_size
    assert meta["data_fingerprint"] and meta["epochs_trained"] == 2
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (3, 4)
    # weights_only load: the file holds tensors and plain values only.
    blob = torch.load(out / "model.pt", weights_only=True)
    assert set(blob["state_dict"]) == set(model.state_dict())


@pytest.mark.ray
def test_nonfinite_loss_stops_with_epoch_and_step(ray_local, synthetic_shards, tmp_path) -> None:
    from pipeline.training.trainer import build_trainer, make_job, run

    p = tiny_params(synthetic_shards, tmp_path / "ckpt", amp="none", max_failures=0, momentum=0.0)
    job = make_job(p, "resnet18", 1e12, 0, p.train.epochs, None)
    with pytest.raises(Exception, match=r"non-finite training loss at epoch \d+ step \d+"):
        run(build_trainer(job, p, name="nan", num_workers=0, storage_path=str(tmp_path / "ckpt")))


@pytest.mark.ray
def test_grad_stats_reach_mlflow_through_ray_train(ray_local, synthetic_shards, tmp_path, monkeypatch) -> None:
    """train.log_grad_stats: per-layer gradient norms and dead-ReLU ratios travel with the epoch metrics
    through Ray Train's report to MLflow, and stay out of the per-epoch history (the curve CSV)."""
    from pipeline import tracking
    from pipeline.analysis.measure import gradient_stats
    from pipeline.training.trainer import build_trainer, make_job, run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = tiny_params(synthetic_shards, tmp_path / "ckpt", epochs=1, log_grad_stats="true")
    run_id = tracking.start_run(p.tracking.experiment, "grad-stats", {"test": "ray"})
    job = make_job(p, "resnet18", 0.05, 0, p.train.epochs, run_id, grad_stats=gradient_stats)
    outcome = run(build_trainer(job, p, name="gradstats", num_workers=0, storage_path=str(tmp_path / "ckpt")))
    assert not any(k.startswith(("grad_norm/", "dead_relu/")) for k in outcome.history[-1])
    logged = tracking.run_metrics(run_id)
    assert logged["grad_norm/total"] > 0 and logged["grad_norm/conv1"] > 0 and "grad_norm/fc" in logged
    assert 0.0 <= logged["dead_relu/mean"] <= 1.0 and "dead_relu/layer1.0.relu.call2" in logged
    assert [step for step, _ in tracking.metric_history(run_id, "grad_norm/total")] == [1]


@pytest.mark.ray
def test_workers_holding_every_cpu_fail_fast_instead_of_starving_ingest(ray_local, synthetic_shards, tmp_path) -> None:
    import ray

    from pipeline.cluster import ResourcesUnavailable
    from pipeline.training.trainer import build_trainer, make_job

    cpus = int(ray.cluster_resources()["CPU"])  # init_ray: the cores + 2 for data
    p = tiny_params(synthetic_shards, tmp_path / "ckpt", cpus_per_worker=cpus / 2)
    job = make_job(p, "resnet18", 0.05, 0, p.train.epochs, None)
    # The request counts one decode task's CPU beside the workers: the local Ray cannot grow, so it fails at once.
    with pytest.raises(ResourcesUnavailable, match=r"needs 2 x \{CPU: [\d.]+\} \+ 1 x \{CPU: 1\}.*cannot grow: "
                       r"1 more CPU .*Lower train.num_workers, train.cpus_per_worker"):
        build_trainer(job, p, name="starved", num_workers=2, storage_path=str(tmp_path / "ckpt"))
