"""train: every recipe component equals timm train.py's, built from timm's own helpers (tests/timm_reference.py);
the stage's loop equals train.py's over many updates, per gradient, on every world shape; the sampler is timm's per
virtual rank; precision is what the params say.

The reference is never built from rsb: see tests/timm_reference.py for what it mirrors.
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
import torch
import yaml
from PIL import Image
from timm.layers import DropPath
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.datasets import ImageFolder

import timm_reference as ref
from rsb import distributed
from rsb.config import ConfigError, load_params, resolve
from rsb.data import loader as loaders
from rsb.data.datasets import Split
from rsb.io import load_weights
from rsb.training import create_loss, create_model, create_optimizer, create_scheduler

from conftest import ROOT, clean_env, write_params

RECIPES = ("a1", "a2", "a3", "t2", "ft")  # the paper's three, DeiT's (T2, for A2 vs T2) and the transfer fine-tune
NAME = "test_resnet-a1"


def params_file(tmp_path: Path, prepared: Path, overrides: dict | None = None) -> Path:
    return write_params(tmp_path / "params.yaml", prepared, {"train.precision": "fp32", **(overrides or {})})


def both_sides(path: Path, recipe: str, arch: str = "resnet18", world: int = 1):
    """(rsb's resolved recipe, train.py's args) for the same params file."""
    r = resolve(load_params(path), arch, recipe, world_size=world)
    args = ref.args_for(yaml.safe_load(path.read_text()), recipe, arch, 20, r.micro_batch, world, r.grad_accum,
                        r.train.precision)
    return r, args


# --- 1. each recipe component is train.py's ------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", RECIPES)
def test_model_optimizer_schedule_equal_train_py(tmp_path, prepared, recipe):
    r, args = both_sides(params_file(tmp_path, prepared), recipe)
    torch.manual_seed(r.train.seed)  # as rsb.training.train seeds before creating the model
    ours, theirs = create_model(r, 20), ref.create_model(args)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    assert [m.drop_prob for m in ours.modules() if isinstance(m, DropPath)] == \
        [m.drop_prob for m in theirs.modules() if isinstance(m, DropPath)]
    assert r.lr == args.lr  # train.py's lr_base rule (here `none`: the recipe's lr) x the mini run's factor

    o, t = create_optimizer(ours, r), ref.create_optimizer(theirs, args)
    assert type(o) is type(t) and o.defaults == t.defaults
    names = {id(p): n for n, p in ours.named_parameters()} | {id(p): n for n, p in theirs.named_parameters()}

    def groups(opt):
        return [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                for g in opt.param_groups]
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
    p = params_file(tmp_path, prepared, {"recipes.a3.mixup": 0.0, "recipes.a3.cutmix": 0.0,
                                         "recipes.a3.smoothing": smoothing, "recipes.a3.bce_loss": bce})
    r, args = both_sides(p, "a3")
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
def test_micro_batches_are_timms_sampler_per_virtual_rank(prepared, recipe, repeats):
    ds = Split(prepared, "train")
    micro, virtual = 4, 4
    args = ref.Namespace(aug_repeats=repeats)
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
                sampler = loaders.MicroBatchSampler(ds, micro, accum, world, rank, repeats)
                sampler.set_epoch(epoch)
                for i, batch in enumerate(sampler):
                    u, v = i // accum, rank * accum + i % accum
                    assert [idx for idx, _ in batch] == streams[v][u * micro:(u + 1) * micro], (world, accum, u, v)
                    updates.setdefault(u, []).extend(idx for idx, _ in batch)
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
    seeds = [s for batch in epoch(0) for _, s in batch]
    assert len(set(seeds)) == len(seeds)
    assert {s for b in epoch(0) for _, s in b}.isdisjoint({s for b in epoch(1) for _, s in b})
    assert [i for b in epoch(0, seed=1) for i, _ in b] == [i for b in epoch(0) for i, _ in b]  # order is timm's
    assert epoch(0, seed=1) != epoch(0)  # the run's seed changes augmentation


# --- 3. the stage's loop equals train.py's: per update, per gradient, final weights --------------------------------

PARITY = {"models": ["test_resnet"], "scale.epochs": 0.001, "scale.min_epochs": 1, "recipes.a1.warmup_epochs": 240,
          "train.eval_every": 0}  # one epoch of 10 updates; warmup = 4 updates, then cosine


def reference_run(path: Path, extracted: Path, world: int, accum: int, precision: str = "fp32",
                  loss_scale: float = 1.0, recipe: str = "a1", arch: str = "test_resnet") -> ref.Reference:
    raw = yaml.safe_load(path.read_text())
    micro = raw["scale"]["batch_size"] // (world * accum)
    args = ref.args_for(raw, recipe, arch, 20, micro, world * accum, 1, precision)  # world x accum processes
    dataset = ImageFolder(str(extracted / "train"), transform=ref.train_transform(args, ref.create_model(args)))
    torch.set_num_threads(1)  # as the stage's processes run in these tests (train.threads: 1)
    r = ref.Reference(args, dataset, world * accum)
    if loss_scale != 1.0:
        inner = r.loss_fn
        r.loss_fn = lambda out, y: inner(out, y) * loss_scale
    r.train_epoch(0)
    return r


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
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: grads.append(
        [p.grad.detach().float().clone() for g in opt.param_groups for p in g["params"]]))
    try:
        yield grads
    finally:
        handle.remove()


def read_outputs(d: Path, grads: list, name: str = NAME) -> dict:
    with open(d / "plots/train" / f"{name}.updates.csv") as f:
        rows = list(csv.DictReader(f))
    return {"loss": [float(r["loss"]) for r in rows], "lr": [float(r["lr"]) for r in rows], "grads": grads,
            "state": load_weights(d / "models" / f"{name}.safetensors")}


def assert_same_run(ours: dict, theirs: ref.Reference, early: float = 1e-5, late: float = 5e-3) -> None:
    """Same lr (exactly), loss and averaged gradient at every update, same final weights and BatchNorm statistics.
    Two sides that sum the same gradients in another order (all-reduce vs a mean) differ by ~1e-8 (relative norm)
    at the first update; LAMB amplifies that rounding in near-zero gradients (its update is ~sign(g)), to ~5e-4
    after 10 updates (measured). A missing 1/world or 1/accumulation factor is off by 0.5 or more from update 1."""
    log = theirs.log
    assert len(ours["loss"]) == len(log) == len(ours["grads"]) >= 8
    lr = ours["lr"]
    assert lr == pytest.approx([u["lr"] for u in log], rel=1e-12)
    assert lr[:4] == sorted(set(lr[:4])) and lr[4:] == sorted(set(lr[4:]), reverse=True), "warmup, then cosine"
    for n, (mine, u) in enumerate(zip(ours["grads"], log), 1):
        assert [a.shape for a in mine] == [b.shape for b in u["grads"]]
        e = off(torch.cat([a.flatten() for a in mine]), torch.cat([b.flatten() for b in u["grads"]]))
        assert e <= (early if n <= 3 else late), f"update {n}: the gradient is off by {e:.2e} (relative norm)"
    assert ours["loss"] == pytest.approx([u["loss"] for u in log], rel=early)
    state = theirs.model.state_dict()
    for k, v in ours["state"].items():
        if v.is_floating_point():  # weights, and BatchNorm statistics after distribute_bn
            assert off(v, state[k]) <= 1e-3, f"{k}: off by {off(v, state[k]):.2e} (relative norm)"


def off(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-30))


@pytest.mark.parametrize("accum", [2, 4])
def test_updates_equal_train_py_on_one_process_accumulating(tmp_path, prepared, extracted, monkeypatch, world,
                                                            accum):
    """World 1 x accumulation k against train.py on k processes: lr, loss, the averaged gradient at every one of
    10 updates (warmup into cosine), and the final weights and BatchNorm statistics, fp32."""
    p = params_file(tmp_path, prepared, {**PARITY, "train.micro_batch": 16 // accum})
    assert_same_run(our_run_in_process(tmp_path, p, monkeypatch), reference_run(p, extracted, 1, accum))


def test_t2_updates_equal_train_py_with_deits_flags(tmp_path, prepared, extracted, monkeypatch, world):
    """T2 (DeiT's procedure: AdamW, SoftTargetCrossEntropy on Mixup 0.8 / CutMix 1.0 with smoothing 0.1, random
    erasing 0.25, bicubic training interpolation, drop path 0.1, 3 repeats) through stages.train, one process
    accumulating 2, against train.py on 2 processes with the same flags: lr, loss and gradient at every update,
    final weights. AdamW normalizes its step per element, so the late tolerance is LAMB's."""
    p = params_file(tmp_path, prepared, {**PARITY, "recipes.t2.warmup_epochs": 120, "train.micro_batch": 8})
    ours = our_run_in_process(tmp_path, p, monkeypatch, recipe="t2")
    theirs = reference_run(p, extracted, 1, 2, recipe="t2")
    assert type(theirs.loss_fn).__name__ == "SoftTargetCrossEntropy" and type(theirs.optimizer).__name__ == "AdamW"
    assert_same_run(ours, theirs)


def test_t2_on_a_vit_equals_train_py(tmp_path, prepared, extracted, monkeypatch):
    """T2 on timm's small ViT (no BatchNorm; built for the scaled 32 px on both sides) through stages.train, one
    process accumulating 2, against train.py on 2 processes: lr, loss and gradient at every update, final weights."""
    p = params_file(tmp_path, prepared, {**PARITY, "models": ["test_vit"], "recipes.t2.warmup_epochs": 120,
                                         "train.micro_batch": 8})
    ours = our_run_in_process(tmp_path, p, monkeypatch, recipe="t2", arch="test_vit")
    theirs = reference_run(p, extracted, 1, 2, recipe="t2", arch="test_vit")
    assert theirs.args.model_kwargs == {"img_size": 32}
    assert_same_run(ours, theirs)


def launch(tmp_path: Path, path: Path, devices: int, accelerator: str = "cpu", recipe: str = "a1",
           same_grads: bool = True) -> dict:
    """The stage through the real launcher (rsb.launch -> deepspeed for more than one process)."""
    env = clean_env(RSB_TRACKING="off", GRADS_OUT=str(tmp_path / "grads"), DS_ACCELERATOR=accelerator,
                    PYTHONPATH=f"{ROOT / 'src'}:{ROOT}:{ROOT / 'tests'}")
    out = subprocess.run([sys.executable, "-m", "rsb.launch", "--devices", str(devices), "parity_worker", "--arch",
                          "test_resnet", "--recipe", recipe, "--params", str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    grads = [torch.load(tmp_path / "grads" / f"grads-rank{r}.pt") for r in range(devices)]
    for other in grads[1:] if same_grads else []:  # every rank hands the optimizer the same averaged gradient
        assert all(torch.equal(a, b) for x, y in zip(grads[0], other) for a, b in zip(x, y))
    return read_outputs(tmp_path, grads[0], f"test_resnet-{recipe}")


@pytest.mark.parametrize("accum", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_updates_equal_train_py_on_two_processes(tmp_path, prepared, extracted, accum):
    """World 2 (x accumulation) through rsb.launch -> deepspeed, the real MicroBatchSampler and distribute_bn,
    against train.py on 2 x accum processes."""
    p = params_file(tmp_path, prepared, {**PARITY, "train.devices": 2, "train.micro_batch": 16 // (2 * accum)})
    assert_same_run(launch(tmp_path, p, 2), reference_run(p, extracted, 2, accum))
    cost = json.loads((tmp_path / "metrics/train/test_resnet-a1.json").read_text())
    assert cost["devices"] == 2 and cost["device_hours"] == pytest.approx(2 * cost["train/wall_s"] / 3600)


def test_t2_with_zero_on_two_processes_equals_train_py(tmp_path, prepared, extracted):
    """T2 (AdamW) with ZeRO stage 2 through rsb.launch -> deepspeed on 2 processes against train.py on 2 processes:
    lr and loss at every update and the final weights. (The gradient each rank's optimizer sees is its ZeRO shard,
    so gradients are compared through their effect: the weights.)"""
    p = params_file(tmp_path, prepared, {**PARITY, "recipes.t2.warmup_epochs": 120, "train.devices": 2,
                                         "train.micro_batch": 8, "train.zero_stage": 2,
                                         "train.channels_last": False})
    ours = launch(tmp_path, p, 2, recipe="t2", same_grads=False)
    theirs = reference_run(p, extracted, 2, 1, recipe="t2")
    shard, full = ours["grads"][0], sum(v.numel() for v in theirs.model.parameters())
    assert all(g.dim() == 1 for g in shard) and sum(g.numel() for g in shard) < full, "ZeRO was not on"
    log = theirs.log
    assert len(ours["loss"]) == len(log) >= 8
    assert ours["lr"] == pytest.approx([u["lr"] for u in log], rel=1e-12)
    assert ours["loss"] == pytest.approx([u["loss"] for u in log], rel=1e-5)
    state = theirs.model.state_dict()
    for k, v in ours["state"].items():
        if v.is_floating_point():
            assert off(v, state[k]) <= 1e-3, f"{k}: off by {off(v, state[k]):.2e} (relative norm)"


def test_bf16_autocast_equals_train_py_amp(tmp_path, prepared, extracted, monkeypatch, world):
    """precision bf16: our DeepSpeed torch_autocast run against train.py --amp --amp-dtype bfloat16. Measured
    bit-identical on the CPU; the tolerance (1e-2) leaves room for another kernel order, and a 2x gradient (0.66 /
    1.03) or a skipped autocast (0.56 / 1.40) is far outside it."""
    p = params_file(tmp_path, prepared, {**PARITY, "train.precision": "bf16"})
    ours = our_run_in_process(tmp_path, p, monkeypatch)

    def distance(theirs: ref.Reference) -> tuple[float, float]:
        g = max(float(torch.linalg.vector_norm(torch.cat([a.flatten() - b.flatten() for a, b in zip(x, u["grads"])]))
                      / torch.linalg.vector_norm(torch.cat([b.flatten() for b in u["grads"]])))
                for x, u in zip(ours["grads"], theirs.log))
        state = theirs.model.state_dict()
        w = max(float((v - state[k]).abs().max() / state[k].abs().max().clamp_min(1e-12))
                for k, v in ours["state"].items() if v.is_floating_point() and "running" not in k)
        return g, w
    g, w = distance(reference_run(p, extracted, 1, 2, "bf16"))
    assert g < 1e-2 and w < 1e-2, (g, w)
    g2, w2 = distance(reference_run(p, extracted, 1, 2, "bf16", loss_scale=2.0))
    assert g2 > 0.1 and w2 > 0.1, "a 2x gradient would pass"
    g32, w32 = distance(reference_run(p, extracted, 1, 2, "fp32"))
    assert g32 > 0.1 and w32 > 0.1, "a skipped autocast would pass"


# --- 4. precision is what the params say -----------------------------------------------------------------------------

@pytest.mark.parametrize("precision, amp, expect", [("bf16", True, torch.bfloat16), ("fp32", True, torch.float32),
                                                    ("bf16", False, torch.float32)])
def test_the_stage_trains_in_the_precision_the_params_say(tmp_path, prepared, monkeypatch, world, precision, amp,
                                                          expect):
    """Activations of every convolution during training have the dtype the params say; weights stay fp32;
    `recipes.*.amp: false` is fp32 whatever train.precision says."""
    from torch.nn.modules.module import register_module_forward_hook

    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = params_file(tmp_path, prepared, {**PARITY, "train.precision": precision, "recipes.a1.amp": amp})
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


@pytest.mark.parametrize("cuda, cuda_bf16, flags, expect", [
    (True, True, set(), "bf16"),                              # Ampere and newer
    (True, False, set(), "fp16"),                             # V100 and older
    (False, None, {"avx512f", "avx512_bf16"}, "bf16"),        # Zen 4, Cooper Lake: native bf16
    (False, None, {"avx512f", "amx_bf16", "amx_tile"}, "bf16"),  # Sapphire Rapids
    (False, None, {"avx512f", "avx512bw", "avx512_vnni"}, "fp32"),  # AVX-512 without bf16: emulated, slower
    (False, None, {"avx2", "fma"}, "fp32"),
    (False, None, set(), "fp32"),
])
def test_auto_precision_is_what_is_fast(cuda, cuda_bf16, flags, expect):
    from rsb.config import auto_precision
    assert auto_precision(cuda=cuda, cuda_bf16=cuda_bf16, flags=flags) == expect


# --- 5. the stage's outputs, the MLflow run, and bad setups --------------------------------------------------------

def test_stage_outputs_and_mlflow_run(tmp_path, prepared, monkeypatch, world):
    from mlflow.tracking import MlflowClient

    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    p = params_file(tmp_path, prepared, {"train.eval_every": 1})
    metrics = main(["--arch", "test_resnet", "--recipe", "a3", "--params", str(p)])
    name = "test_resnet-a3"
    assert metrics["val/top1"] >= 0 and metrics["epochs"] == 2
    assert json.loads((tmp_path / "metrics/train" / f"{name}.json").read_text()) == metrics
    rows = (tmp_path / "plots/train" / f"{name}.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_lr") and len(rows) == 3
    state = load_weights(tmp_path / "models" / f"{name}.safetensors")
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
    params = load_params(write_params(tmp_path / "p.yaml", prepared, {"train.zero_stage": 2,
                                                                      "train.channels_last": False}))
    with pytest.raises(ConfigError, match=r"train.zero_stage = 2 with recipes.a1.opt = 'lamb': ZeRO partitions"):
        resolve(params, "resnet18", "a1", world_size=1)
    assert resolve(params, "resnet18", "t2", world_size=1).train.zero_stage == 2
    with pytest.raises(ConfigError, match=r"train.zero_stage = 3: must be one of 0, 1, 2 \(DeepSpeed ZeRO 1/2"):
        load_params(write_params(tmp_path / "q.yaml", prepared, {"train.zero_stage": 3}))


def test_resume_digest_follows_recipe_code_and_versions(tmp_path, monkeypatch):
    """A checkpoint resumes only the same resolved recipe, training code and library versions."""
    import importlib.metadata as md
    import shutil

    from rsb import checkpoint

    code = tmp_path / "rsb"
    shutil.copytree(Path(checkpoint.__file__).parent, code)
    base = checkpoint.resume_digest("recipe", code)
    assert base == checkpoint.resume_digest("recipe", code) == checkpoint.resume_digest("recipe")
    assert checkpoint.resume_digest("other recipe", code) != base
    for module in checkpoint.TRAINING_CODE:
        original = (code / module).read_bytes()
        (code / module).write_bytes(original + b"\n# a fix\n")
        assert checkpoint.resume_digest("recipe", code) != base, module
        (code / module).write_bytes(original)
    real = md.version
    for pkg in ("torch", "timm", "deepspeed"):
        monkeypatch.setattr(md, "version", lambda name, pkg=pkg: "0.0.1" if name == pkg else real(name))
        assert checkpoint.resume_digest("recipe", code) != base, pkg
    monkeypatch.setattr(md, "version", real)


def test_randaugment_magnitude_10_posterizes_to_black_instead_of_stopping_the_run():
    """DeiT's rand-m9-mstd0.5 draws magnitude 10 (clipped) in ~2% of its ops, where timm's PosterizeIncreasing keeps
    0 bits: Pillow 13 raises on that, the Pillow timm and DeiT were written against gave a black image. rsb.data.loader
    restores the black image (tests/timm_reference.py imports it too, so both sides see the same op)."""
    from PIL import Image
    from timm.data.auto_augment import AugmentOp

    img = Image.new("RGB", (8, 8), (200, 120, 40))
    black = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=10)(img)
    assert black.getextrema() == ((0, 0), (0, 0), (0, 0))
    kept = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=5)(img)  # 2 bits kept: unchanged op
    assert kept.getpixel((0, 0)) == (192, 64, 0)


# facebookresearch/deit main.py, get_args_parser() defaults (read 2026-11-29), in timm train.py option names; lr is
# main.py's linear rule `lr * batch_size * world_size / 512` at the global batch of recipes.t2.
DEIT_MAIN_PY = {"opt": "adamw", "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 5, "warmup_lr": 1e-6,
                "min_lr": 1e-5, "epochs": 300, "smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25,
                "drop_path": 0.1, "aa": "rand-m9-mstd0.5-inc1", "train_interpolation": "bicubic", "bce_loss": False,
                "crop_pct": 0.875, "aug_repeats": 3}


def test_t2_is_deits_main_py():
    """Each T2 value is DeiT's (main.py's defaults); the lr follows its linear rule at T2's batch."""
    t2 = load_params(ROOT / "params.yaml").recipes["t2"]
    assert {k: getattr(t2, k) for k in DEIT_MAIN_PY} == DEIT_MAIN_PY
    assert t2.lr == pytest.approx(5e-4 * t2.batch_size / 512)
