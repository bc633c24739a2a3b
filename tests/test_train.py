"""train: each recipe becomes timm's components; our DeepSpeed step equals timm's; resume and MLflow are exact."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.data.auto_augment import RandAugment
from timm.layers import DropPath
from timm.loss import BinaryCrossEntropy

from rsb import distributed, engine
from rsb.config import ConfigError, load_params, resolve
from rsb.data import loader as loaders
from rsb.training import create_loss, create_model, create_optimizer, create_scheduler

from conftest import ROOT, write_params


@pytest.fixture
def params(tmp_path, prepared):
    return load_params(write_params(tmp_path / "params.yaml", prepared))


@pytest.fixture(scope="module")
def world():
    distributed.init()
    return torch.distributed.get_world_size()


# --- 1. each recipe becomes the right timm components --------------------------------------------------------------

@pytest.mark.parametrize("name, thresh, mixup, smoothing, aa, drop_path, wd", [
    ("a1", 0.2, 0.2, 0.1, "rand-m7-mstd0.5-inc1", 0.05, 0.01),
    ("a2", 0.2, 0.1, 0.0, "rand-m7-mstd0.5-inc1", 0.05, 0.02),
    ("a3", 0.2, 0.1, 0.0, "rand-m6-mstd0.5-inc1", 0.0, 0.02),
])
def test_recipe_becomes_timm_components(params, name, thresh, mixup, smoothing, aa, drop_path, wd):
    r = resolve(params, "resnet18", name, world_size=1)
    loss = create_loss(r)
    # timm train.py with Mixup active: BinaryCrossEntropy(target_threshold=args.bce_target_thresh)
    expected = BinaryCrossEntropy(target_threshold=thresh)
    assert type(loss) is BinaryCrossEntropy and vars(loss).keys() == vars(expected).keys()
    assert (loss.target_threshold, loss.smoothing, loss.reduction) == \
        (expected.target_threshold, expected.smoothing, expected.reduction)
    soft = torch.softmax(torch.randn(4, 20), 1)  # dense (Mixup) targets: the loss's smoothing has no effect
    logits = torch.randn(4, 20)
    assert loss(logits, soft) == BinaryCrossEntropy(smoothing=0.0, target_threshold=thresh)(logits, soft)

    m = loaders.mixup(r, 20)
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing, m.mix_prob, m.switch_prob, m.mode) == \
        (mixup, 1.0, smoothing, 1.0, 0.5, "batch")

    tf = loaders.train_transform(r)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    magnitude = int(aa.split("-")[1][1:])
    assert ra.num_layers == 2 and {op.magnitude for op in ra.ops} == {magnitude}
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    assert "PosterizeIncreasing" in {op.name for op in ra.ops}  # inc1: the increasing-severity op set
    assert not any(type(t).__name__ == "ColorJitter" for t in tf.transforms), "RandAugment disables colour jitter"

    model = create_model(r, 20)
    rates = [mod.drop_prob for mod in model.modules() if isinstance(mod, DropPath)]
    assert (max(rates) if rates else 0.0) == pytest.approx(drop_path)

    opt = create_optimizer(model, r)
    assert type(opt).__name__ == "Lamb"
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = [g for g in opt.param_groups if g["weight_decay"] > 0]
    assert len(decay) == 1 and decay[0]["weight_decay"] == wd
    assert no_decay == {id(p) for p in model.parameters() if p.ndim <= 1}


def test_lr_follows_warmup_then_cosine_per_update(params):
    r = resolve(params, "resnet18", "a1", world_size=1)
    model = create_model(r, 20)
    opt = create_optimizer(model, r)
    updates_per_epoch = 50
    sched = create_scheduler(opt, r, updates_per_epoch)
    total, warm = r.epochs * updates_per_epoch, r.warmup_epochs * updates_per_epoch
    warmup_lr, base, min_lr = r.recipe.warmup_lr, r.lr, r.recipe.min_lr
    assert opt.param_groups[0]["lr"] == pytest.approx(warmup_lr)  # the first update runs at warmup_lr

    def lr_at(t):
        sched.step_update(num_updates=t)
        return opt.param_groups[0]["lr"]

    assert lr_at(int(warm // 2)) == pytest.approx(warmup_lr + int(warm // 2) * (base - warmup_lr) / warm)
    for t in (math.ceil(warm), total // 2, total - 1):
        assert lr_at(t) == pytest.approx(min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total)))
    assert lr_at(total) == pytest.approx(min_lr)


def test_scale_rules(params):
    r = resolve(params, "resnet18", "a3", world_size=1)
    assert (r.img_size, r.test_img_size) == (round(160 * 32 / 224), 32)
    rule = {"sqrt": (16 / 2048) ** 0.5, "linear": 16 / 2048, "none": 1.0}[params.scale.lr_rule]
    assert r.lr == pytest.approx(8e-3 * rule * params.scale.lr_factor)
    assert r.batch_size == r.micro_batch * r.grad_accum * r.world_size
    with pytest.raises(ConfigError, match="scale.batch_size=16 is not micro_batch x devices"):
        resolve(params, "resnet18", "a3", world_size=3)
    with pytest.raises(ConfigError, match="unknown recipe 'a4'"):
        resolve(params, "resnet18", "a4", world_size=1)
    with pytest.raises(ConfigError, match="not under models"):
        resolve(params, "resnet9000", "a1", world_size=1)


def test_zero_with_lamb_is_refused(tmp_path, prepared):
    with pytest.raises(ConfigError, match="zero_stage=2: ZeRO >= 1 .* LAMB's per-tensor trust ratio"):
        load_params(write_params(tmp_path / "p.yaml", prepared, {"train.zero_stage": 2}))


# --- 2. numerical parity with timm's train.py assembly --------------------------------------------------------------

def _fixed_batch(n=8, size=32, classes=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_one_update_equals_timm_train_py(params, world):
    """Our DeepSpeed step vs timm's components assembled as timm's train.py (model, Mixup, BCE, LAMB, autocast)."""
    r = resolve(params, "test_resnet", "a1", world_size=world)
    r = r.__class__(**{**r.__dict__, "grad_accum": 1, "batch_size": r.micro_batch})
    images, labels = _fixed_batch(r.micro_batch)

    def mixed(seed=1):
        import numpy as np
        np.random.seed(seed)
        return loaders.mixup(r, 20)(images.clone(), labels.clone())

    torch.manual_seed(0)
    ref = create_model(r, 20)
    torch.manual_seed(0)
    ours = create_model(r, 20)
    # timm train.py: optimizer.zero_grad(); with amp_autocast(): loss = loss_fn(model(x), y); loss.backward(); step
    ref_opt = create_optimizer(ref, r)
    x, y = mixed()
    torch.manual_seed(7)
    ref_loss = create_loss(r)(ref(x), y)
    ref_loss.backward()
    ref_opt.step()

    eng = distributed.initialize(ours, create_optimizer(ours, r), r)
    step = engine.Step(engine=eng, loss_fn=create_loss(r), mixup_fn=None, scheduler=None, device=torch.device("cpu"),
                       dtype=None, channels_last=False)
    x, y = mixed()
    torch.manual_seed(7)
    our_loss = engine.forward_backward(step, x, y)
    assert our_loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    for (name, a), b in zip(ref.named_parameters(), eng.module.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_matches_torch_autocast(params, world):
    """DeepSpeed's torch_autocast block gives the loss torch.autocast gives (the paper's mixed precision)."""
    r = resolve(params, "test_resnet", "a3", world_size=world)
    r = r.__class__(**{**r.__dict__, "grad_accum": 1, "batch_size": r.micro_batch,
                       "train": r.train.__class__(**{**r.train.__dict__, "precision": "bf16"})})
    images, labels = _fixed_batch(r.micro_batch)
    targets = torch.nn.functional.one_hot(labels, 20).float()
    torch.manual_seed(0)
    ref = create_model(r, 20)
    torch.manual_seed(0)
    eng = distributed.initialize(create_model(r, 20), create_optimizer(create_model(r, 20), r), r)
    eng.module.load_state_dict(ref.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = create_loss(r)(ref(images), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        our_loss = create_loss(r)(eng(images), targets)
    assert our_loss.item() == ref_loss.item()


# --- 3. 2 processes x 1 micro-step == 1 process x 2 accumulation steps ----------------------------------------------

WORKER = ROOT / "tests" / "ds_worker.py"


def _launch(nproc: int, accum: int, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={distributed.free_port()}", str(WORKER), str(accum), str(out)]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)


def test_two_processes_equal_one_process_accumulating(tmp_path):
    _launch(2, 1, tmp_path / "two.pt")
    _launch(1, 2, tmp_path / "one.pt")
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    for name in one["params"]:
        torch.testing.assert_close(two["params"][name], one["params"][name], rtol=1e-5, atol=1e-6, msg=name)


# --- 4. killed and resumed == uninterrupted ------------------------------------------------------------------------

# kill -9 mid-epoch and resume: tests/test_reliability.py (the fault matrix)


# --- 5. outputs and the MLflow run, read back through the client ----------------------------------------------------

def test_stage_outputs_and_mlflow_run(tmp_path, prepared, monkeypatch, world):
    from mlflow.tracking import MlflowClient

    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = write_params(tmp_path / "params.yaml", prepared, {"train.eval_every": 1})
    metrics = main(["--arch", "test_resnet", "--recipe", "a3", "--params", str(p)])
    name = "test_resnet-a3"
    assert metrics["val/top1"] >= 0 and metrics["epochs"] == 2
    assert json.loads((tmp_path / "metrics/train" / f"{name}.json").read_text()) == metrics
    rows = (tmp_path / "plots/train" / f"{name}.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_lr") and len(rows) == 3
    state = torch.load(tmp_path / "models" / f"{name}.pt", weights_only=True)
    assert "fc.weight" in state
    run_info = json.loads((tmp_path / "runs" / f"{name}.json").read_text())

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["recipe.aa"] == "rand-m6-mstd0.5-inc1"
    assert run.data.params["epochs"] == "2" and run.data.params["ds_config.zero_optimization.stage"] == "0"
    for tag in ("rsb.stage", "rsb.params_hash", "rsb.data_digest", "mlflow.source.git.commit", "rsb.dvc_exp"):
        assert tag in run.data.tags, tag
    assert run.data.tags["rsb.data_digest"] == json.loads((prepared / "info.json").read_text())["digest"]
    steps = client.get_metric_history(run.info.run_id, "train/loss_step")
    assert len(steps) == metrics["updates"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/top1")][:2] == [1, 2]
    artifacts = {a.path for d in ("config", "history", "model") for a in client.list_artifacts(run.info.run_id, d)}
    assert {f"config/{name}.json", f"history/{name}.csv", f"model/{name}.pt"} <= artifacts


def test_checkpoint_of_another_run_is_refused(tmp_path, world):
    from rsb import checkpoint

    d = tmp_path / "ck"
    (d / "epoch1").mkdir(parents=True)
    (d / "epoch1" / "rsb.json").write_text(json.dumps({"digest": "aaaa", "epoch": 1}))
    (d / "latest").write_text("epoch1")
    with pytest.raises(checkpoint.CheckpointMismatch, match="written for recipe digest aaaa"):
        checkpoint.load(None, d, "bbbb")
    # the resume digest covers the recipe (and the training code and library versions)
    assert checkpoint.resume_digest("a") != checkpoint.resume_digest("b")
    assert checkpoint.resume_digest("a") == checkpoint.resume_digest("a")
