"""train: every recipe component equals timm train.py's, built from timm's own helpers (tests/timm_reference.py);
the stage's loop equals train.py's on real processes over two epochs and across a resume, per update and per tensor,
on every world shape; the sampler is timm's per virtual rank; precision is what the params say.

The reference borrows nothing from rsb: its recipes are the paper's table, its seeds docs/seeds.md's.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm_reference as ref
import torch
import yaml
from conftest import ROOT, clean_env, write_params
from PIL import Image
from timm.layers import DropPath
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.datasets import ImageFolder

from rsb import loader as loaders
from rsb.config import ConfigError, load_params, resolve
from rsb.data.datasets import Split
from rsb.io import load_weights
from rsb.models import create_model
from rsb.net import free_port
from rsb.training import create_loss, create_optimizer, create_scheduler

RECIPES = ("a1", "a2", "a3", "t2", "ft")  # the paper's three, DeiT's (T2, for A2 vs T2) and the transfer fine-tune
NAME = "test_resnet-a1"


def params_file(tmp_path: Path, prepared: Path, overrides: dict | None = None) -> Path:
    return write_params(tmp_path / "params.yaml", prepared, {"train.precision": "fp32", **(overrides or {})})


def both_sides(path: Path, recipe: str, arch: str = "resnet18", world: int = 1, overrides: dict | None = None):
    """(rsb's resolved recipe, train.py's args) for the same params file; the recipe keys of `overrides` (those the
    file was written with) go to train.py too."""
    r = resolve(load_params(path), arch, recipe, world_size=world)
    args = ref.args_for(
        yaml.safe_load(path.read_text()),
        recipe,
        arch,
        20,
        r.micro_batch,
        world,
        r.grad_accum,
        r.train.precision,
        overrides=overrides,
    )
    return r, args


# --- 1. each recipe component is train.py's ------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", RECIPES)
def test_model_optimizer_schedule_equal_train_py(tmp_path, prepared, recipe):
    r, args = both_sides(params_file(tmp_path, prepared), recipe)
    torch.manual_seed(r.train.seed)  # as rsb.training.train seeds before creating the model
    ours, theirs = create_model(r, 20), ref.model_of_rank(args)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert [m.drop_prob for m in ours.modules() if isinstance(m, DropPath)] == [
        m.drop_prob for m in theirs.modules() if isinstance(m, DropPath)
    ]
    assert r.lr == args.lr  # train.py's lr_base rule (here `none`: the recipe's lr) x the mini run's factor

    o, t = create_optimizer(ours, r), ref.create_optimizer(theirs, args)
    assert type(o) is type(t) and o.defaults == t.defaults
    names = {id(p): n for n, p in ours.named_parameters()} | {id(p): n for n, p in theirs.named_parameters()}

    def groups(opt):
        return [
            ({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
            for g in opt.param_groups
        ]

    assert groups(o) == groups(t)

    updates_per_epoch = 7
    so, st = create_scheduler(o, r, updates_per_epoch), ref.create_scheduler(t, args, updates_per_epoch)
    for n in range(r.epochs * updates_per_epoch + 2):
        so.step_update(num_updates=n)
        st.step_update(num_updates=n)
        assert o.param_groups[0]["lr"] == t.param_groups[0]["lr"], f"update {n}"


@pytest.mark.parametrize("recipe", RECIPES)
def test_mixup_loss_transform_equal_train_py(tmp_path, prepared, extracted, recipe):
    r, args = both_sides(params_file(tmp_path, prepared), recipe)
    mo, mt = loaders.mixup(r, 20), ref.create_mixup(args)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 20, (8,))
    if recipe == "ft":  # the fine-tune mixes nothing: class indices go to the loss, as in train.py
        assert mo is None and mt is None
        xo = xt = x
        yo = yt = y
    else:
        assert mo is not None and vars(mo) == vars(mt)
        loaders.seed_all(3)
        xo, yo = mo(x.clone(), y.clone())
        loaders.seed_all(3)
        xt, yt = mt(x.clone(), y.clone())
        assert torch.equal(xo, xt) and torch.equal(yo, yt)

    lo, lt = create_loss(r), ref.create_loss(args)
    assert type(lo) is type(lt)
    keys = ("smoothing", "target_threshold", "reduction", "sum_classes", "weight", "pos_weight")
    assert {k: getattr(lo, k, None) for k in keys} == {k: getattr(lt, k, None) for k in keys}
    logits = torch.randn(8, 20)
    assert torch.equal(lo(logits, yo), lt(logits, yt))

    model = timm_model("resnet18")
    to, tt = loaders.train_transform(r, model), ref.train_transform(args, model)
    assert repr(to) == repr(tt)
    for path in sample_images(extracted):  # decoded as both sides decode them (PNG, CMYK included)
        img = Image.open(path).convert("RGB")
        for seed in range(3):
            loaders.seed_all(seed)
            a = to(img)
            loaders.seed_all(seed)
            assert torch.equal(a, tt(img)), path


@pytest.mark.parametrize("smoothing, bce", [(0.1, False), (0.0, False), (0.1, True)])
def test_losses_without_mixup_are_train_pys(tmp_path, prepared, smoothing, bce):
    """A recipe without Mixup/CutMix: no Mixup object (train.py hands the loss class indices) and train.py's loss
    for the smoothing and BCE settings (LabelSmoothingCrossEntropy, CrossEntropyLoss, smoothed BCE)."""
    cfg = {
        "recipes.a3.mixup": 0.0,
        "recipes.a3.cutmix": 0.0,
        "recipes.a3.smoothing": smoothing,
        "recipes.a3.bce_loss": bce,
    }
    r, args = both_sides(params_file(tmp_path, prepared, cfg), "a3", overrides=cfg)
    assert loaders.mixup(r, 20) is None and ref.create_mixup(args) is None
    lo, lt = create_loss(r), ref.create_loss(args)
    assert type(lo) is type(lt)
    logits, labels = torch.randn(8, 20), torch.randint(0, 20, (8,))
    assert torch.equal(lo(logits, labels), lt(logits, labels))


def test_transforms_take_the_models_own_normalization(tmp_path, prepared):
    """train.py and validate.py normalize with the model's pretrained config (`resolve_data_config`), which is not
    ImageNet's mean/std for every architecture."""
    r, args = both_sides(params_file(tmp_path, prepared), "a1", arch="test_resnet")
    model = timm_model("test_resnet")  # its config says mean = std = 0.5
    assert repr(loaders.train_transform(r, model)) == repr(ref.train_transform(args, model))
    norm = loaders.eval_transform(32, 0.95, model).transforms[-1]
    assert norm.mean.tolist() == [0.5, 0.5, 0.5] and norm.std.tolist() == [0.5, 0.5, 0.5]


def timm_model(arch: str):
    import timm

    return timm.create_model(arch, num_classes=20)


def sample_images(extracted: Path) -> list[Path]:
    files = sorted((extracted / "train").rglob("*.JPEG"))
    odd = [f for f in files if f.stem.endswith(("_png", "_cmyk"))]
    assert len(odd) == 2, "the mini release has ImageNet's PNG-named-JPEG and a CMYK JPEG"
    return odd + files[:2]


@pytest.mark.parametrize("rule, factor", [("sqrt", 1.0), ("linear", 1.0), ("none", 1.0), ("sqrt", 3.0)])
def test_lr_rules_are_train_pys(tmp_path, prepared, rule, factor):
    """train.py: lr = lr_base x (global batch / lr_base_size), square-rooted for 'sqrt'; the recipe's lr is the
    paper's at its batch 2048."""
    p = params_file(tmp_path, prepared, {"scale.lr_rule": rule, "scale.lr_factor": factor})
    for recipe in RECIPES:
        r, args = both_sides(p, recipe)
        assert r.lr == pytest.approx(args.lr, rel=1e-12)
    expected = {"sqrt": (16 / 2048) ** 0.5, "linear": 16 / 2048, "none": 1.0}[rule] * 8e-3 * factor
    assert both_sides(p, "a3")[0].lr == pytest.approx(expected, rel=1e-12)  # a3, by hand


def test_warmup_ramps_linearly_then_cosine(tmp_path, prepared):
    """An interior warmup update is on the line warmup_lr -> lr; after warmup, the cosine of train.py."""
    import math

    p = params_file(tmp_path, prepared, {"scale.epochs": 0.01, "recipes.a1.warmup_epochs": 120})
    r, _ = both_sides(p, "a1")
    opt = create_optimizer(create_model(r, 20), r)
    sched = create_scheduler(opt, r, updates_per_epoch=10)
    warm, total = r.warmup_epochs * 10, r.epochs * 10
    assert (r.epochs, warm) == (6, 12)
    lrs = []
    for t in range(total + 1):
        sched.step_update(num_updates=t)
        lrs.append(opt.param_groups[0]["lr"])
    w0, base, low = r.recipe.warmup_lr, r.lr, r.recipe.min_lr
    assert lrs[0] == pytest.approx(w0)
    assert lrs[5] == pytest.approx(w0 + 5 * (base - w0) / warm)
    assert lrs[5] - lrs[4] == pytest.approx(lrs[6] - lrs[5])  # a line
    for t in (12, 30, 59):
        assert lrs[t] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / total)))


# --- 2. the sampler is timm's, per virtual rank ---------------------------------------------------------------------


@pytest.mark.parametrize("recipe, repeats", [("a1", 3), ("a3", 0)])
def test_micro_batches_are_timms_sampler_per_virtual_rank(tmp_path, prepared, recipe, repeats):
    """The recipe's repeated augmentation (the paper's: A1 3 copies, A3 none) through MicroBatchSampler, per world
    shape, is timm's sampler of each virtual rank, and every shape forms the same updates."""
    r, args = both_sides(params_file(tmp_path, prepared), recipe)
    assert r.recipe.aug_repeats == args.aug_repeats == repeats
    ds = Split(prepared, "train")
    micro, virtual = 4, 4
    for epoch in (0, 1):
        streams = []
        for v in range(virtual):
            s = ref.create_sampler(ds, args, virtual, v)
            s.set_epoch(epoch)
            streams.append(list(s))
        per_shape = {}
        for world, accum in ((1, 4), (2, 2), (4, 1)):
            updates: dict[int, list[int]] = {}
            for rank in range(world):
                sampler = loaders.MicroBatchSampler(ds, micro, accum, world, rank, r.recipe.aug_repeats)
                sampler.set_epoch(epoch)
                for i, batch in enumerate(sampler):
                    u, v = i // accum, rank * accum + i % accum
                    assert [idx for idx, *_ in batch] == streams[v][u * micro : (u + 1) * micro], (world, accum, u, v)
                    updates.setdefault(u, []).extend(idx for idx, *_ in batch)
            per_shape[(world, accum)] = {u: sorted(x) for u, x in updates.items()}
        assert per_shape[(1, 4)] == per_shape[(2, 2)] == per_shape[(4, 1)]
    if repeats:
        where: dict[int, list[tuple]] = {}
        for v, stream in enumerate(streams):
            for pos, idx in enumerate(stream):
                where.setdefault(idx, []).append((pos // micro, v))
        copies = [places for places in where.values() if len(places) > 1]
        assert copies and all(len(set(p)) == len(p) for p in copies), "copies of an image share a micro-batch"
        assert max(len(p) for p in copies) == repeats


def test_streams_and_augmentation_seeds(prepared):
    """Epochs differ; a sampler rebuilt at an epoch boundary (a resume) yields the same micro-batches and seeds;
    every sample of an epoch, repeated copies included, gets its own augmentation seed."""
    ds = Split(prepared, "train")

    def epoch(e, seed=0):
        s = loaders.MicroBatchSampler(ds, 4, 2, 1, 0, 3, seed=seed)
        s.set_epoch(e)
        return list(s)

    assert epoch(0) != epoch(1) and epoch(1) == epoch(1)
    seeds = [s for batch in epoch(0) for _, s, _ in batch]
    assert len(set(seeds)) == len(seeds)
    assert {s for b in epoch(0) for _, s, _ in b}.isdisjoint({s for b in epoch(1) for _, s, _ in b})
    assert [i for b in epoch(0, seed=1) for i, *_ in b] == [i for b in epoch(0) for i, *_ in b]  # order is timm's
    assert epoch(0, seed=1) != epoch(0)  # the run's seed changes augmentation
    # with the prefetcher, each micro-batch's collate has a seed of its own, the same for all its samples
    mix = [{m for *_, m in b} for b in epoch(0)]
    assert all(len(m) == 1 for m in mix) and len(set.union(*mix)) == len(mix)


# --- 3. the stage's loop equals train.py's: per update, per gradient, final weights --------------------------------

PARITY = {
    "models": ["test_resnet"],
    "scale.epochs": 0.001,
    "scale.min_epochs": 2,
    "recipes.a1.warmup_epochs": 120,
    "train.eval_every": 1,
    "train.seed": 3,
}
# two epochs of 10 updates with an evaluation after each; warmup = 4 updates, then cosine; a seed that is not the
# default, so a stage that ignored train.seed anywhere would draw other numbers than train.py
# T2 trained in the grid, whose stages declare no EMA folder: its model EMA off (it never feeds back into training;
# its own parity: test_the_model_ema_across_a_stop_and_a_resume_equals_deits)
T2_IN_THE_GRID = {"recipes.t2.model_ema": False}


def reference_run(
    path: Path,
    extracted: Path,
    world: int,
    accum: int,
    cfg: dict | None = None,
    precision: str = "fp32",
    loss_scale: float = 1.0,
    recipe: str = "a1",
    arch: str = "test_resnet",
    epochs: int | None = None,
    device: str = "cpu",
    init_scale: float | None = None,
) -> ref.Result:
    """train.py on `world x accum` real processes for the params file's run; `cfg` is the override dict the test
    gave params_file (the recipe keys in it go to train.py too: the recipe itself is the paper's). Cached per
    test session: the resume test reuses the uninterrupted run's."""
    raw = yaml.safe_load(path.read_text())
    key = (
        path.read_text(),
        world,
        accum,
        repr(sorted((cfg or {}).items())),
        precision,
        loss_scale,
        recipe,
        arch,
        epochs,
        device,
        init_scale,
    )
    if key not in _REFERENCE_RUNS:
        micro = raw["scale"]["batch_size"] // (world * accum)
        args = ref.args_for(raw, recipe, arch, 20, micro, world * accum, 1, precision, overrides=cfg)
        plant = {
            **({"loss_scale": loss_scale} if loss_scale != 1.0 else {}),
            **({"init_scale": init_scale} if init_scale else {}),
        }
        _REFERENCE_RUNS[key] = ref.run(
            args, extracted / "train", world * accum, epochs, extracted / "val", plant or None, device=device
        )
    return _REFERENCE_RUNS[key]


_REFERENCE_RUNS: dict = {}


def our_run_in_process(tmp_path: Path, path: Path, monkeypatch, recipe: str = "a1", arch: str = "test_resnet") -> dict:
    """stages.train.main in this process (a world of one), with torch's optimizer pre-hook recording gradients."""
    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    with recorded_grads() as grads:
        main(["--arch", arch, "--recipe", recipe, "--params", str(path)])
    return read_outputs(tmp_path, grads, f"{arch}-{recipe}")


@contextmanager
def recorded_grads():
    """Every gradient the optimizer is handed, per update (torch's global optimizer step pre-hook, not a patch)."""
    grads: list = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, a, k: grads.append([p.grad.detach().float().clone() for g in opt.param_groups for p in g["params"]])
    )
    try:
        yield grads
    finally:
        handle.remove()


def read_outputs(d: Path, grads: list, name: str = NAME) -> dict:
    with open(d / "plots/train" / f"{name}.updates.csv") as f:
        rows = list(csv.DictReader(f))
    with open(d / "plots/train" / f"{name}.csv") as f:
        epochs = list(csv.DictReader(f))
    return {
        "loss": [float(r["loss"]) for r in rows],
        "lr": [float(r["lr"]) for r in rows],
        "grads": grads,
        "state": load_weights(d / "models" / f"{name}.safetensors"),
        "val": [float(e["val_top1"]) for e in epochs if e.get("val_top1")],
    }


# Tolerances, per tensor (relative norm): gradients of the first 3 updates, of later ones, final state.
EXACT = (1e-6, 1e-6, 1e-6)
# Where the two sides sum the averaged gradient of 4 micro-batches in another order (DDP's all-reduce over 4
# processes vs one process accumulating 4), they differ by ~1e-7 at update 1; LAMB amplifies that rounding in
# near-zero gradients (its update is ~sign(g)) to 3e-5 by update 3 and 5e-5 by update 9 in the worst tensor, with
# single jumps where an activation crosses a ReLU (5.6e-3 in one tensor at update 10), and to 1e-3..0.6 in epoch 2
# (measured, test_resnet, 32 px, 4 images per micro-batch): such a shape is compared over one epoch. The final
# weights stayed within 3e-5. A missing factor or a wrong draw is off by ~0.5-1.
REORDERED = (1e-4, 2e-2, 1e-3)


def assert_same_run(ours: dict, theirs: ref.Result, updates: int = 20, tol: tuple = EXACT) -> None:
    """Same lr (exactly), loss and averaged gradient at every update, same final weights and BatchNorm statistics,
    each tensor on its own; the same val top-1 after each epoch (to one image).
    Sums of two gradients are exact in any order, so the 2-process and 2-slot shapes are bit-identical to train.py
    (measured: every gradient, weight and statistic equal over 2 epochs); EXACT leaves 1e-6 for another kernel.
    A missing 1/world or 1/accumulation factor is off by 0.5 or more from update 1; a wrong epoch's draws, order or
    optimizer state by ~1 in the epoch they touch."""
    early, late, state = tol
    log = theirs.log
    assert len(ours["loss"]) == len(log) == len(ours["grads"]) == updates
    lr = ours["lr"]
    assert lr == pytest.approx([u["lr"] for u in log], rel=1e-12)
    assert lr[:4] == sorted(set(lr[:4])) and lr[4:] == sorted(set(lr[4:]), reverse=True), "warmup, then cosine"
    names = [f"tensor {i}" for i in range(len(log[0]["grads"]))]
    for n, (mine, u) in enumerate(zip(ours["grads"], log), 1):
        assert [a.shape for a in mine] == [b.shape for b in u["grads"]]
        for name, a, b in zip(names, mine, u["grads"]):
            e = off(a, b)
            assert e <= (early if n <= 3 else late), f"update {n}, {name}: the gradient is off by {e:.2e}"
    assert ours["loss"] == pytest.approx([u["loss"] for u in log], rel=early)
    assert_same_state(ours["state"], theirs.state, state)
    if theirs.val:
        assert ours["val"] == pytest.approx(theirs.val, abs=100 / 80 + 1e-9), "val top-1 after each epoch"


def assert_same_state(ours: dict, theirs: dict, tol: float = 1e-3) -> None:
    """Every parameter and BatchNorm buffer, tensor by tensor (counters exactly)."""
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        if v.is_floating_point():
            assert off(v, theirs[k]) <= tol, f"{k}: off by {off(v, theirs[k]):.2e} (relative norm)"
        else:
            assert torch.equal(v, theirs[k]), k


def off(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float(
        torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30)
    )


def test_updates_equal_train_py_on_one_process_accumulating(tmp_path, prepared, extracted, monkeypatch, world):
    """World 1 x accumulation 2 against train.py on 2 processes over two epochs with an evaluation between them:
    lr, loss and every tensor of the averaged gradient at each of 20 updates (warmup into cosine, across the epoch
    boundary), the val top-1 after each epoch, and every final weight and BatchNorm statistic, fp32."""
    cfg = {**PARITY, "train.micro_batch": 8}
    p = params_file(tmp_path, prepared, cfg)
    assert_same_run(our_run_in_process(tmp_path, p, monkeypatch), reference_run(p, extracted, 1, 2, cfg))


def test_updates_equal_train_py_with_its_prefetcher(tmp_path, prepared, extracted, monkeypatch, world):
    """train.py's default data path on a GPU, here on the CPU (timm's PrefetchLoader takes any device): uint8
    batches mixed by FastCollateMixup, normalized and erased (A1 with T2's 0.25 erasing, so that it runs) by
    PrefetchLoader; 1 x 2 against train.py on 2 processes over two epochs, as the test above."""
    cfg = {**PARITY, "train.micro_batch": 8, "train.prefetcher": True, "recipes.a1.reprob": 0.25}
    p = params_file(tmp_path, prepared, cfg)
    assert_same_run(our_run_in_process(tmp_path, p, monkeypatch), reference_run(p, extracted, 1, 2, cfg))


@pytest.mark.slow  # 10 s; the fast suite keeps 1 x 2, 2 x 1 and the resume; CI runs this
def test_updates_equal_train_py_on_one_process_accumulating_4(tmp_path, prepared, extracted, monkeypatch, world):
    """World 1 x accumulation 4 against train.py on 4 processes, one epoch of 10 updates (REORDERED: see there)."""
    cfg = {
        **PARITY,
        "train.micro_batch": 4,
        "scale.min_epochs": 1,
        "train.eval_every": 0,
        "recipes.a1.warmup_epochs": 240,
    }
    p = params_file(tmp_path, prepared, cfg)
    assert_same_run(our_run_in_process(tmp_path, p, monkeypatch), reference_run(p, extracted, 1, 4, cfg), 10, REORDERED)


class StopAfterEpoch(Exception):
    """Ends the stage right after epoch 1's checkpoint is published (the process's training state dies with it)."""


def test_a_run_resumed_in_a_fresh_process_equals_train_pys_uninterrupted_run(
    tmp_path, prepared, extracted, monkeypatch, world
):
    """One process accumulating 2 trains epoch 1 and stops after its checkpoint; a fresh process (rsb.launch, as
    dvc.yaml runs it) resumes and trains epoch 2. Together they equal train.py's uninterrupted two epochs on 2
    processes: lr, loss and gradients at every update (so the optimizer's moments, the update count and the
    schedule came back), every weight and BatchNorm statistic at the end, val top-1 after each epoch."""
    from rsb import checkpoint
    from stages.train import main

    cfg = {**PARITY, "train.micro_batch": 8}
    p = params_file(tmp_path, prepared, cfg)
    save = checkpoint.save

    def save_then_stop(engine, ckpt_dir, tag, *args):
        save(engine, ckpt_dir, tag, *args)
        raise StopAfterEpoch

    monkeypatch.setattr(checkpoint, "save", save_then_stop)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    with recorded_grads() as first, pytest.raises(StopAfterEpoch):
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    assert len(first) == 10 and not (tmp_path / "models" / f"{NAME}.safetensors").exists()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rsb.launch",
            "--devices",
            "1",
            "parity_worker",
            "--arch",
            "test_resnet",
            "--recipe",
            "a1",
            "--params",
            str(p),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(
            RSB_TRACKING="off", GRADS_OUT=str(tmp_path / "grads"), PYTHONPATH=f"{ROOT / 'src'}:{ROOT}:{ROOT / 'tests'}"
        ),
    )
    assert out.returncode == 0 and "resumed" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    second = torch.load(tmp_path / "grads" / "grads-rank0.pt")
    assert len(second) == 10
    assert_same_run(read_outputs(tmp_path, first + second, NAME), reference_run(p, extracted, 1, 2, cfg))


def test_the_model_ema_across_a_stop_and_a_resume_equals_deits(tmp_path, prepared, extracted, monkeypatch, world):
    """DeiT's --model-ema (timm.utils.ModelEma, updated after each optimizer step, in its checkpoint) through
    stages.train in the procedures study, one process accumulating 2: stopped by SIGTERM inside epoch 1 (after
    update 7, a checkpoint inside the epoch), resumed in process, two epochs in all. The EMA's weights and
    BatchNorm statistics equal DeiT's loop driving timm's class on train.py's 2 processes (rank 0's, as DeiT saves
    it), as do the model's updates and weights; the decay is DeiT's 0.99996 rescaled to this run's 20 updates."""
    import os
    import signal

    from rsb import engine, errors
    from rsb.io import read_json
    from stages.train import main

    cfg = {**PARITY, "train.micro_batch": 8, "recipes.a1.model_ema": True, "recipes.a1.model_ema_decay": 0.99996}
    p = params_file(tmp_path, prepared, cfg)
    args = ["--arch", "test_resnet", "--recipe", "a1", "--params", str(p), "--study", "procedures"]
    calls, forward_backward = {"n": 0}, engine.forward_backward

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 13:  # inside update 7 (accumulation 2)
            os.kill(os.getpid(), signal.SIGTERM)
        return forward_backward(*a, **k)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with monkeypatch.context() as m, recorded_grads() as first, pytest.raises(errors.Stopped):
        m.setattr(engine, "forward_backward", signalled)
        main(args)
    signal.signal(signal.SIGTERM, before[0])
    signal.signal(signal.SIGUSR1, before[1])
    with recorded_grads() as second:
        main(args)
    assert len(first) == 7 and len(second) == 13
    study = tmp_path / "studies" / "procedures"
    ours, theirs = read_outputs(study, first + second, NAME), reference_run(p, extracted, 1, 2, cfg)
    assert_same_run(ours, theirs)
    info = read_json(study / "ema" / NAME / "ema.json")
    assert info["decay_per_update"] == pytest.approx(0.99996 ** (600 * 625 / 20), rel=1e-12)
    assert theirs.ema is not None
    assert_same_state(load_weights(study / "ema" / NAME / "model_ema.safetensors"), theirs.ema, EXACT[2])
    assert any(off(theirs.ema[k], theirs.state[k]) > 1e-2 for k in theirs.state), "the EMA is not the model"


@pytest.mark.slow  # 8 s; T2's components stay fast (test_mixup_loss_transform_equal_train_py[t2], ...)
def test_t2_updates_equal_train_py_with_deits_flags(tmp_path, prepared, extracted, monkeypatch, world):
    """T2 (DeiT's procedure: AdamW, SoftTargetCrossEntropy on Mixup 0.8 / CutMix 1.0 with smoothing 0.1, random
    erasing 0.25, bicubic training interpolation, drop path 0.1, 3 repeats) through stages.train, one process
    accumulating 2, against train.py on 2 processes with the same flags: lr, loss and gradient at every update,
    final weights. AdamW normalizes its step per element, so the late tolerance is LAMB's."""
    cfg = {**PARITY, **T2_IN_THE_GRID, "recipes.t2.warmup_epochs": 60, "train.micro_batch": 8}
    p = params_file(tmp_path, prepared, cfg)
    ours = our_run_in_process(tmp_path, p, monkeypatch, recipe="t2")
    theirs = reference_run(p, extracted, 1, 2, cfg, recipe="t2")
    assert theirs.info["loss"] == "SoftTargetCrossEntropy" and theirs.info["optimizer"] == "AdamW"
    assert_same_run(ours, theirs)


@pytest.mark.slow  # 6 s; T2's flags stay in the fast suite on test_resnet; CI runs this
def test_t2_on_a_vit_equals_train_py(tmp_path, prepared, extracted, monkeypatch):
    """T2 on timm's small ViT (no BatchNorm; built for the scaled 32 px on both sides) through stages.train, one
    process accumulating 2, against train.py on 2 processes: lr, loss and gradient at every update, final weights."""
    cfg = {**PARITY, **T2_IN_THE_GRID, "models": ["test_vit"], "recipes.t2.warmup_epochs": 60, "train.micro_batch": 8}
    p = params_file(tmp_path, prepared, cfg)
    ours = our_run_in_process(tmp_path, p, monkeypatch, recipe="t2", arch="test_vit")
    theirs = reference_run(p, extracted, 1, 2, cfg, recipe="t2", arch="test_vit")
    assert theirs.args.model_kwargs == {"img_size": 32}
    assert_same_run(ours, theirs)


def launch(
    tmp_path: Path,
    path: Path,
    devices: int,
    accelerator: str = "cpu",
    recipe: str = "a1",
    same_grads: bool = True,
    **env_extra: str,
) -> dict:
    """The stage through the real launcher (rsb.launch -> deepspeed for more than one process)."""
    env = clean_env(
        RSB_TRACKING="off",
        GRADS_OUT=str(tmp_path / "grads"),
        DS_ACCELERATOR=accelerator,
        PYTHONPATH=f"{ROOT / 'src'}:{ROOT}:{ROOT / 'tests'}",
        **env_extra,
    )
    port = free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rsb.launch",
            "--devices",
            str(devices),
            "--master-port",
            str(port),
            "parity_worker",
            "--arch",
            "test_resnet",
            "--recipe",
            recipe,
            "--params",
            str(path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # DeepSpeed's CPU shm op makes a 66 MB /dev/shm segment per rank, named by uid, address, port and rank, and never
    # unlinks it; rsb.distributed.release_shm does once every rank has mapped them (nothing left in RAM after a run)
    left = [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(devices)]
    assert not [n for n in left if (Path("/dev/shm") / n).exists()], "shared memory left behind"
    grads = [torch.load(tmp_path / "grads" / f"grads-rank{r}.pt") for r in range(devices)]
    for other in grads[1:] if same_grads else []:  # every rank hands the optimizer the same averaged gradient
        assert all(torch.equal(a, b) for x, y in zip(grads[0], other) for a, b in zip(x, y))
    return read_outputs(tmp_path, grads[0], f"test_resnet-{recipe}")


@pytest.mark.parametrize("accum", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_updates_equal_train_py_on_two_processes(tmp_path, prepared, extracted, accum):
    """World 2 (x accumulation) through rsb.launch -> deepspeed, the real MicroBatchSampler and distribute_bn,
    against train.py on 2 x accum processes. 2 x 2 sums 4 micro-batches in another order than DDP's all-reduce over
    4 processes (seen in CI: 1.07e-6 at update 2), so it is compared over one epoch, REORDERED, as accumulation 4."""
    cfg = {**PARITY, "train.devices": 2, "train.micro_batch": 16 // (2 * accum)}
    if accum > 1:
        cfg.update({"scale.min_epochs": 1, "train.eval_every": 0, "recipes.a1.warmup_epochs": 240})
    p = params_file(tmp_path, prepared, cfg)
    assert_same_run(
        launch(tmp_path, p, 2),
        reference_run(p, extracted, 2, accum, cfg),
        *((20, EXACT) if accum == 1 else (10, REORDERED)),
    )
    cost = json.loads((tmp_path / "metrics/train/test_resnet-a1.json").read_text())
    assert cost["devices"] == 2 and cost["device_hours"] == pytest.approx(2 * cost["train/wall_s"] / 3600)


@pytest.mark.slow  # 27 s; CI runs it
def test_t2_with_zero_on_two_processes_equals_train_py(tmp_path, prepared, extracted):
    """T2 (AdamW) with ZeRO stage 2 through rsb.launch -> deepspeed on 2 processes against train.py on 2 processes:
    lr and loss at every update and the final weights. (The gradient each rank's optimizer sees is its ZeRO shard,
    so gradients are compared through their effect: the weights.)"""
    cfg = {
        **PARITY,
        **T2_IN_THE_GRID,
        "recipes.t2.warmup_epochs": 60,
        "train.devices": 2,
        "train.micro_batch": 8,
        "train.zero_stage": 2,
        "train.channels_last": False,
    }
    p = params_file(tmp_path, prepared, cfg)
    ours = launch(tmp_path, p, 2, recipe="t2", same_grads=False)
    theirs = reference_run(p, extracted, 2, 1, cfg, recipe="t2")
    shard, full = ours["grads"][0], sum(g.numel() for g in theirs.log[0]["grads"])
    assert all(g.dim() == 1 for g in shard) and sum(g.numel() for g in shard) < full, "ZeRO was not on"
    log = theirs.log
    assert len(ours["loss"]) == len(log) == 20
    assert ours["lr"] == pytest.approx([u["lr"] for u in log], rel=1e-12)
    assert ours["loss"] == pytest.approx([u["loss"] for u in log], rel=1e-5)
    assert_same_state(ours["state"], theirs.state)
    assert ours["val"] == pytest.approx(theirs.val, abs=100 / 80 + 1e-9)


@pytest.mark.slow  # 16 s; the fast suite keeps the precision wiring (test_the_stage_trains_in_the_precision_...)
def test_bf16_autocast_equals_train_py_amp(tmp_path, prepared, extracted, monkeypatch, world):
    """precision bf16: our DeepSpeed torch_autocast run against train.py --amp --amp-dtype bfloat16, one epoch.
    Measured bit-identical on the CPU; the tolerance (1e-2) leaves room for another kernel order, and a 2x gradient
    or a skipped autocast is far outside it (both measured with this test's own two runs)."""
    cfg = {**PARITY, "train.precision": "bf16", "scale.min_epochs": 1, "train.eval_every": 0}
    p = params_file(tmp_path, prepared, cfg)
    ours = our_run_in_process(tmp_path, p, monkeypatch)

    def distance(theirs: ref.Result) -> tuple[float, float]:
        g = max(off(a, b) for x, u in zip(ours["grads"], theirs.log) for a, b in zip(x, u["grads"]))
        w = max(
            float((v - theirs.state[k]).abs().max() / theirs.state[k].abs().max().clamp_min(1e-12))
            for k, v in ours["state"].items()
            if v.is_floating_point() and "running" not in k
        )
        return g, w

    g, w = distance(reference_run(p, extracted, 1, 2, cfg, "bf16"))
    assert g < 1e-2 and w < 1e-2, (g, w)
    g2, w2 = distance(reference_run(p, extracted, 1, 2, cfg, "bf16", loss_scale=2.0))
    assert g2 > 0.1 and w2 > 0.1, "a 2x gradient would pass"
    g32, w32 = distance(reference_run(p, extracted, 1, 2, cfg, "fp32"))
    assert g32 > 0.1 and w32 > 0.1, "a skipped autocast would pass"


# --- 4. precision is what the params say -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, amp, expect",
    [("bf16", True, torch.bfloat16), ("fp32", True, torch.float32), ("bf16", False, torch.float32)],
)
def test_the_stage_trains_in_the_precision_the_params_say(
    tmp_path, prepared, monkeypatch, world, precision, amp, expect
):
    """Activations of every convolution during training have the dtype the params say; weights stay fp32;
    `recipes.*.amp: false` is fp32 whatever train.precision says."""
    from torch.nn.modules.module import register_module_forward_hook

    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = params_file(
        tmp_path,
        prepared,
        {**PARITY, "scale.min_epochs": 1, "train.eval_every": 0, "train.precision": precision, "recipes.a1.amp": amp},
    )
    seen, weights = Counter(), set()

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d) and module.training:
            seen[output.dtype] += 1
            weights.add(module.weight.dtype)

    handle = register_module_forward_hook(hook)
    try:
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    finally:
        handle.remove()
    assert set(seen) == {expect} and seen[expect] > 0 and weights == {torch.float32}
    run = json.loads((tmp_path / "runs" / f"{NAME}.json").read_text())
    assert run["resolved"]["train"]["precision"] == {torch.bfloat16: "bf16", torch.float32: "fp32"}[expect]


# --- 5. the stage's outputs, the MLflow run, and bad setups --------------------------------------------------------


def test_stage_outputs_and_mlflow_run(tmp_path, prepared, extracted, monkeypatch, world):
    from mlflow.tracking import MlflowClient

    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = params_file(tmp_path, prepared, {"train.eval_every": 1})
    metrics = main(["--arch", "test_resnet", "--recipe", "a3", "--params", str(p)])
    name = "test_resnet-a3"
    assert metrics["epochs"] == 2 and metrics["val/count"] == 80
    assert json.loads((tmp_path / "metrics/train" / f"{name}.json").read_text()) == metrics
    rows = (tmp_path / "plots/train" / f"{name}.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_lr") and len(rows) == 3
    state = load_weights(tmp_path / "models" / f"{name}.safetensors")
    _, args = both_sides(p, "a3", arch="test_resnet")  # the saved weights, scored by train.py's validate
    model = ref.create_model(args)
    model.load_state_dict(state)
    val = ImageFolder(str(extracted / "val"), transform=ref.eval_transform(args, model))
    assert metrics["val/top1"] == pytest.approx(ref.validate(model, val, args, ref.suppress, 1, 0), abs=100 / 80)
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
    artifacts = {a.path for d in ("config", "history", "weights") for a in client.list_artifacts(run.info.run_id, d)}
    assert {f"config/{name}.json", f"history/{name}.csv", f"weights/{name}.safetensors"} <= artifacts


def test_scale_and_world_shape_errors(tmp_path, prepared):
    p = params_file(tmp_path, prepared)
    with pytest.raises(ConfigError, match="scale.batch_size=16 is not micro_batch x devices"):
        resolve(load_params(p), "resnet18", "a3", world_size=3)
    with pytest.raises(ConfigError, match="unknown recipe 'a4'"):
        resolve(load_params(p), "resnet18", "a4", world_size=1)
    with pytest.raises(ConfigError, match="not under models"):
        resolve(load_params(p), "resnet9000", "a1", world_size=1)
    r = resolve(load_params(p), "resnet18", "a3", world_size=1)
    assert (r.img_size, r.test_img_size) == (round(160 * 32 / 224), 32)
    assert r.batch_size == r.micro_batch * r.grad_accum * r.world_size


def test_zero_is_refused_with_lamb_and_allowed_with_adamw(tmp_path, prepared):
    """ZeRO partitions flattened parameters: LAMB's per-tensor trust ratio would change, AdamW's element-wise update
    does not. Refused at resolve (the stage's start, before any work), for the recipe being trained."""
    with pytest.raises(ConfigError, match=r"train.zero_stage = 1 with train.channels_last = true: DeepSpeed's ZeRO"):
        load_params(write_params(tmp_path / "c.yaml", prepared, {"train.zero_stage": 1}))
    params = load_params(
        write_params(tmp_path / "p.yaml", prepared, {"train.zero_stage": 2, "train.channels_last": False})
    )
    with pytest.raises(ConfigError, match=r"train.zero_stage = 2 with recipes.a1.opt = 'lamb': ZeRO partitions"):
        resolve(params, "resnet18", "a1", world_size=1)
    assert resolve(params, "resnet18", "t2", world_size=1).train.zero_stage == 2
    with pytest.raises(ConfigError, match=r"train.zero_stage = 3: must be one of 0, 1, 2 \(DeepSpeed ZeRO 1/2"):
        load_params(write_params(tmp_path / "q.yaml", prepared, {"train.zero_stage": 3}))


def test_randaugment_magnitude_10_posterizes_to_black_instead_of_stopping_the_run():
    """DeiT's rand-m9-mstd0.5 draws magnitude 10 (clipped) in ~2% of its ops, where timm's PosterizeIncreasing keeps
    0 bits: Pillow 13 raises on that, the Pillow timm and DeiT were written against gave a black image. rsb.loader
    restores the black image (tests/timm_reference.py imports it too, so both sides see the same op)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    img = Image.new("RGB", (8, 8), (200, 120, 40))
    black = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    kept = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img)  # 2 bits kept: unchanged op
    assert kept.getpixel((0, 0)) == (192, 64, 0)


@pytest.mark.parametrize("name", sorted(ref.RECIPES))
def test_params_yaml_recipes_are_the_references(name):
    """Every value of params.yaml's recipes is the independent reference's: the paper's table for A1-A3 (with
    train.py's 2021 defaults for the keys it does not list), DeiT's main.py for T2, the pinned fine-tune."""
    rec, expected = load_params(ROOT / "params.yaml").recipes[name], ref.recipe(name)
    for key, value in expected.items():
        ours = getattr(rec, key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert ours == pytest.approx(value, rel=1e-12), f"recipes.{name}.{key}"
        else:
            assert ours == value and type(ours) is type(value), f"recipes.{name}.{key}"


def test_the_reference_recipes_are_the_paper_table():
    """The reference reads the copied table (the paper's A1/A2/A3) itself: a few cells by hand."""
    assert ref.recipe("a1")["aa"] == "rand-m7-mstd0.5-inc1" and ref.recipe("a3")["aa"] == "rand-m6-mstd0.5-inc1"
    assert (ref.recipe("a1")["epochs"], ref.recipe("a2")["epochs"], ref.recipe("a3")["epochs"]) == (600, 300, 100)
    assert (
        ref.recipe("a3")["lr"] == 0.008 and ref.recipe("a3")["img_size"] == 160 and ref.recipe("a3")["aug_repeats"] == 0
    )
    assert ref.recipe("a1", {"recipes.a1.warmup_epochs": 9, "recipes.a2.lr": 1.0})["warmup_epochs"] == 9
    assert ref.DEIT_MAIN_PY["lr"] == pytest.approx(5e-4 * 2048 / 512)


@pytest.mark.parametrize("recipe", ["a3", "a1"])
def test_train_py_grad_accum_steps_is_another_run_than_our_accumulation(tmp_path, prepared, recipe):
    """W processes accumulating K micro-batches here equal train.py on W*K processes (the parity tests), not
    train.py --grad-accum-steps K on W processes. Where the two agree: updates per epoch, the lr at each, and the
    images of every update (the same global batch). Where they differ: which images share a micro-batch (BatchNorm's
    batch, and Mixup's: one draw per micro-batch); with repeated augmentation (A1/A2) train.py's accumulation puts
    copies of one image into the same micro-batch, here they never share one (as on W*K processes)."""
    world, accum, micro = 2, 2, 4
    cfg = {"train.devices": world, "train.micro_batch": micro}
    r, theirs_args = both_sides(params_file(tmp_path, prepared, cfg), recipe, arch="test_resnet", world=world)
    assert (r.grad_accum, theirs_args.grad_accum_steps, theirs_args.world_size) == (accum, accum, world)
    ds = Split(prepared, "train")
    ours, theirs = [], []  # per rank: micro-batches (lists of image indices) in order
    for rank in range(world):
        sampler = loaders.MicroBatchSampler(ds, micro, accum, world, rank, r.recipe.aug_repeats, seed=r.train.seed)
        ours.append([[i for i, *_ in batch] for batch in sampler])
        timm_sampler = ref.create_sampler(ds, theirs_args, world, rank)
        timm_sampler.set_epoch(0)
        theirs.append([[i for i, _ in batch] for batch in ref.micro_batches(timm_sampler, micro)])
    updates = {len(b) // accum for b in ours + theirs}
    assert updates == {loaders.MicroBatchSampler(ds, micro, accum, world, 0, r.recipe.aug_repeats).updates}

    def lrs(scheduler, optimizer, n):
        out = []
        for u in range(n):
            scheduler.step_update(num_updates=u)
            out.append(optimizer.param_groups[0]["lr"])
        return out

    n = updates.pop()
    o, t = create_optimizer(create_model(r, 20), r), ref.create_optimizer(ref.create_model(theirs_args), theirs_args)
    assert lrs(create_scheduler(o, r, n), o, r.epochs * n) == lrs(
        ref.create_scheduler(t, theirs_args, n), t, r.epochs * n
    )

    def per_update(batches):
        return [sorted(i for rank in batches for b in rank[u * accum : (u + 1) * accum] for i in b) for u in range(n)]

    micro_sets = {
        side: {tuple(sorted(b)) for rank in batches for b in rank}
        for side, batches in (("ours", ours), ("theirs", theirs))
    }
    assert micro_sets["ours"] != micro_sets["theirs"], "the same micro-batches"
    assert all(len(set(b)) == len(b) for rank in ours for b in rank), "copies of an image share a micro-batch here"
    assert per_update(ours) == per_update(theirs)
    together = any(len(set(b)) < len(b) for rank in theirs for b in rank)
    assert together == bool(r.recipe.aug_repeats), "train.py's accumulation: copies of an image in one micro-batch"
