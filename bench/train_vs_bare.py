"""Our train stage against a bare loop built from the same timm components, side by side in one process.

    python -m bench.train_vs_bare [--archs resnet50 resnet18] [--recipe a1] [--epochs 1] [--repeats 2]

The bare loop is what timm's train.py does for one process: the same model, transforms, sampler, Mixup/CutMix, BCE,
LAMB and per-update cosine schedule over the same batches, with plain `loss.backward()` / `optimizer.step()`: no
DeepSpeed, no MLflow, no DVC, no checkpoints. "Ours" is the train stage's job itself (`rsb.trainer.train_recipe`:
DeepSpeed engine, MLflow logging into a throwaway sqlite store, per-epoch checkpoints). Both time the epoch loop the
same way (loader start to last update, img/s = images seen / seconds); runs alternate bare/ours to cancel drift on a
shared machine, and the ratio is given of the medians and of the best runs (the best is least disturbed by other
tenants). Data: the mini release of params.yaml (generated into a temp folder). Prints one table; --json writes it."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from bench import scratch
from rsb import distributed, hardware
from rsb import loader as loaders
from rsb.config import load_params, resolve
from rsb.data.datasets import Split
from rsb.models import create_model
from rsb.training import create_loss, create_optimizer, create_scheduler

ROOT = Path(__file__).resolve().parents[1]


def prepared_mini(work: Path, params_file: Path) -> Path:
    from rsb.data.mini import write_release
    from rsb.data.prepare import build
    from rsb.data.spec import MiniSpec

    spec = MiniSpec(**yaml.safe_load(params_file.read_text())["data"]["mini"])
    write_release(work / "raw", spec)
    build(work / "raw", work / "prepared", "mini", verify_md5=False)
    return work / "prepared"


def bare_parts(r, prepared: Path) -> SimpleNamespace:
    """timm train.py's components for one process, as both bare benches use them."""
    torch.manual_seed(r.train.seed)
    model = create_model(r, len(json.loads((prepared / "classes.json").read_text())))
    train_set = Split(prepared, "train", loaders.train_transform(r, model))
    if r.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, r)
    updates = loaders.MicroBatchSampler(train_set, r.micro_batch, r.grad_accum, 1, 0, r.recipe.aug_repeats).updates
    return SimpleNamespace(
        train_set=train_set,
        model=model,
        optimizer=optimizer,
        loss_fn=create_loss(r),
        mixup_fn=loaders.mixup(r, train_set.num_classes),
        scheduler=create_scheduler(optimizer, r, updates),
        dtype=hardware.AUTOCAST[r.train.precision],
    )


CPU = torch.device("cpu")


def bare_epochs(r, prepared: Path, device: torch.device = CPU) -> float:
    """timm train.py's loop, one process: img/s over all epochs."""
    b = bare_parts(r, prepared)
    b.model.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seen, seconds, num_updates = 0, 0.0, 0
    for epoch in range(r.epochs):
        loaders.seed_all(loaders.stream_seed(r.train.seed, epoch, 0))
        b.model.train()
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(
            loaders.train_loader(b.train_set, r, 0, epoch, device, loaders.normalization(b.model))
        ):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if r.train.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if b.mixup_fn is not None:  # (with the prefetcher the collate mixed the batch)
                x, y = b.mixup_fn(x, y)
            with torch.autocast(device.type, dtype=b.dtype or torch.float32, enabled=b.dtype is not None):
                loss = b.loss_fn(b.model(x), y)
            (loss / r.grad_accum).backward()
            seen += x.shape[0]
            if (i + 1) % r.grad_accum == 0:
                b.optimizer.step()
                b.optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                b.scheduler.step_update(num_updates=num_updates)
        loss.item()
        sync()
        seconds += time.perf_counter() - t0
    return seen / seconds


def ours(arch: str, recipe: str, params_file: Path, work: Path) -> dict:
    from rsb.config import load_params
    from rsb.trainer import train_recipe

    run_dir = Path(tempfile.mkdtemp(dir=work))
    cwd = os.getcwd()
    os.chdir(run_dir)
    try:
        t0 = time.perf_counter()
        m = train_recipe(load_params(params_file), arch, recipe)
        m["wall_s"] = time.perf_counter() - t0
        return m
    finally:
        os.chdir(cwd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "resnet18"])
    p.add_argument("--recipe", default="a1")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    work = scratch("rsb-bench-")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["prepared"] = str(prepared_mini(work, ROOT / "params.yaml"))
    raw["scale"].update(min_epochs=a.epochs, epochs=1e-9)  # exactly --epochs epochs of the default scale
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    params = load_params(params_file)
    distributed.init()
    threads = distributed.set_threads(params.train.threads)
    rows = []
    for arch in a.archs:
        r = resolve(params, arch, a.recipe, world_size=1)
        bare, our, extra = [], [], []
        for _ in range(a.repeats):
            bare.append(bare_epochs(r, Path(raw["data"]["prepared"])))
            m = ours(arch, a.recipe, params_file, work)
            our.append(m["train/img_per_s"])
            extra.append(m["wall_s"] - m["train/time_s"])
        row = {
            "arch": arch,
            "recipe": a.recipe,
            "epochs": r.epochs,
            "img_size": r.img_size,
            "batch": f"{r.batch_size} = {r.micro_batch} x {r.grad_accum}",
            "precision": r.train.precision,
            "threads": threads,
            "workers": r.train.workers,
            "bare_img_s": statistics.median(bare),
            "ours_img_s": statistics.median(our),
            "ratio": statistics.median(our) / statistics.median(bare),
            "ratio_best": max(our) / max(bare),
            "ours_outside_loop_s": statistics.median(extra),
            "bare_all": bare,
            "ours_all": our,
        }
        rows.append(row)
        print(
            f"{arch:10s} {a.recipe} {r.img_size}px batch {row['batch']}: bare {row['bare_img_s']:.1f} img/s, "
            f"ours {row['ours_img_s']:.1f} img/s, ratio {row['ratio']:.3f} of medians, {row['ratio_best']:.3f} of "
            f"bests (runs: bare "
            f"{', '.join(f'{x:.1f}' for x in bare)}; ours {', '.join(f'{x:.1f}' for x in our)}); ours spends "
            f"{row['ours_outside_loop_s']:.1f} s outside the epoch loop (DeepSpeed init, checkpoints, val)",
            flush=True,
        )
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
