"""Where one training step's time goes, and what the data loader delivers per worker.

    python -m bench.step_breakdown [--archs resnet50 resnet18] [--updates 12] [--workers 0 1 2]

Step: the bare timm loop (bench.train_vs_bare) on the mini data at the default scale, each phase timed on its own
(the CPU runs synchronously, so phase boundaries are exact): waiting for the loader (1 worker, as the default),
Mixup/CutMix, forward + BCE, backward, LAMB step (+ zero_grad + scheduler), and logging (one MLflow `log_batch` of
10 updates into sqlite, as the train stage does every 10 updates, divided by 10). Loader: images per second of the
train loader alone (decode, RandomResizedCrop, flip, RandAugment, to tensor, normalize) for the A1/A2 and the A3
transform, at 0, 1 and 2 worker processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch
import yaml

from bench import scratch
from bench.train_vs_bare import ROOT, bare_parts, prepared_mini
from rsb import distributed
from rsb import loader as loaders
from rsb.config import load_params, resolve


def step_phases(r, prepared: Path, updates: int, tracker) -> dict:
    b = bare_parts(r, prepared)
    model, optimizer, loss_fn, mixup_fn, scheduler, dtype = (
        b.model,
        b.optimizer,
        b.loss_fn,
        b.mixup_fn,
        b.scheduler,
        b.dtype,
    )
    t = dict.fromkeys(("data", "mixup", "forward", "backward", "optimizer", "logging"), 0.0)
    it, seen, n = (
        iter(loaders.train_loader(b.train_set, r, 0, 0, torch.device("cpu"), loaders.normalization(model))),
        0,
        0,
    )
    next(it)  # worker start-up is not a per-step cost
    model.train()
    for i in range(updates * r.grad_accum):
        c = time.perf_counter()
        x, y = next(it)
        x = x.contiguous(memory_format=torch.channels_last) if r.train.channels_last else x
        t["data"] += (b := time.perf_counter()) - c
        x, y = mixup_fn(x, y)
        t["mixup"] += (c := time.perf_counter()) - b
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(x), y)
        t["forward"] += (b := time.perf_counter()) - c
        (loss / r.grad_accum).backward()
        t["backward"] += (c := time.perf_counter()) - b
        seen += x.shape[0]
        if (i + 1) % r.grad_accum == 0:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            n += 1
            scheduler.step_update(num_updates=n)
            t["optimizer"] += (b := time.perf_counter()) - c
            if n % 10 == 0:
                tracker.log_rows(
                    [{"step": n - k, "loss": 0.5, "lr": 1e-3} for k in range(10)],
                    {"loss": "train/loss_step", "lr": "train/lr_step"},
                )
                t["logging"] += time.perf_counter() - b
    total = sum(t.values())
    return {"img_per_s": seen / total, **{k: v / total for k, v in t.items()}}


def loader_rate(r, prepared: Path, workers: int) -> float:
    b = bare_parts(r, prepared)
    r = dataclasses.replace(r, train=dataclasses.replace(r.train, workers=workers))
    loader = loaders.train_loader(b.train_set, r, 0, 0, torch.device("cpu"), loaders.normalization(b.model))
    t0, seen = time.perf_counter(), 0
    for x, _ in loader:
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def main() -> None:
    from rsb.tracking import MlflowTracker

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["resnet50", "resnet18"])
    p.add_argument("--updates", type=int, default=12)
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    a = p.parse_args()
    work = scratch("rsb-bench-")
    prepared = prepared_mini(work, ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["prepared"] = str(prepared)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(work / "params.yaml")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    distributed.set_threads(params.train.threads)
    tracker = MlflowTracker("bench", "step", system_metrics=False)
    print("| arch | img/s | data wait | mixup | forward+loss | backward | LAMB+sched | logging |")
    print("|---|---|---|---|---|---|---|---|")
    for arch in a.archs:
        s = step_phases(resolve(params, arch, "a1", world_size=1), prepared, a.updates, tracker)
        print(
            f"| {arch} a1 | {s['img_per_s']:.1f} | "
            + " | ".join(f"{100 * s[k]:.1f}%" for k in ("data", "mixup", "forward", "backward", "optimizer", "logging"))
            + " |",
            flush=True,
        )
    print("\n| transform | " + " | ".join(f"{w} worker(s)" for w in a.workers) + " |")
    print("|---|" + "---|" * len(a.workers))
    for recipe in ("a1", "a3"):
        r = resolve(params, a.archs[0], recipe, world_size=1)
        rates = [loader_rate(r, prepared, w) for w in a.workers]
        print(
            f"| {recipe} ({r.img_size} px, {r.recipe.aa}) | " + " | ".join(f"{x:.0f} img/s" for x in rates) + " |",
            flush=True,
        )
    tracker.end()


if __name__ == "__main__":
    main()
