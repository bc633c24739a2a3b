"""train@<arch>-<recipe>: one of the paper's recipes, scaled by params.yaml `scale`, with DeepSpeed on 1..N processes.

    python -m rsb.launch --nodes 1 --devices 8 stages.train --arch resnet50 --recipe a1   (what dvc.yaml runs: one
                                                        process runs the stage directly, more go through `deepspeed`)
    python -m stages.train --arch resnet18 --recipe a3                                   (one process, no launcher)

Writes models/<name>.safetensors (the weights), metrics/train/<name>.json, plots/train/<name>.csv (per epoch) and
<name>.updates.csv (per update), runs/<name>.json (MLflow run + resolved recipe); keeps checkpoints/<name>/<digest>/
to resume from. Rerunning after an interruption resumes from the last finished epoch.

Results card (2 cores AMD EPYC Zen 4, native bf16 so bf16 autocast + channels_last, 2026-11-29, mini default,
batch 64 = 2 x 32 accumulated, `dvc repro` on a fresh clone; stage wall includes ~9-11 s of imports, DeepSpeed init,
validation and checkpoints):
    resnet50  a1 3 ep 32 px: 121 img/s, 39 s training, val 25.6%   a2 2 ep: 106 img/s, 29 s, 23.8%
              a3 2 ep 23 px: 127 img/s, 26 s,          val 20.0%
    resnet18  a1: 208 img/s, 22 s, 23.6%   a2: 216 img/s, 14 s, 21.2%   a3: 210 img/s, 15 s, 21.6%   (chance: 5%)
(fp32 on an EPYC without AVX-512, 2026-11-27: resnet50 ~49 img/s, resnet18 ~74-85 img/s.)
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from rsb import checkpoint, distributed, errors, tracking
from rsb.config import Train, check_option, flatten, load_params, resolve
from rsb.data.datasets import load_classes
from rsb.io import refuse_overlap, save_weights, write_csv, write_json
from rsb.outputs import STUDY_RUNS, Outputs
from rsb.profiling import device_name
from rsb.training import Run, train


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train one (architecture, recipe) with DeepSpeed.")
    p.add_argument("--arch", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--study", default=None, choices=STUDY_RUNS, help="a study's run (e.g. seeds): outputs under studies/<study>/")
    p.add_argument("--seed", type=int, default=None, help="replaces train.seed; the run is <arch>-<recipe>-seed<N>")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by older launchers
    args = p.parse_args(argv)
    check_option(Train, "seed", args.seed, "--seed")
    params = load_params(args.params)
    out = Outputs.of(args.arch, args.recipe, args.study, args.seed)
    world = int(os.environ.get("WORLD_SIZE", params.train.devices * params.train.nodes))
    r = resolve(params, args.arch, args.recipe, world_size=world, seed=args.seed)
    prepared = Path(params.data.prepared)
    refuse_overlap(out.training_outputs(), {"data.prepared": prepared, "data.raw": Path(params.data.raw)})
    load_classes(prepared)  # fails clearly before any process group work if prepare has not run
    tags = {"rsb.kind": "train", "rsb.arch": args.arch, "rsb.recipe": args.recipe, "rsb.study": out.study,
            "rsb.seed": str(r.train.seed)}
    return launch(params, r, out, f"train@{out.name}", tags, prepared,
                  tracking.datasets(prepared, params.data.raw, ("train",)))


def launch(params, r, out: Outputs, stage: str, tags: dict, prepared: Path, datasets: list[dict],
           folder: Path | None = None, start: Path | None = None, identity: str = "") -> dict:
    """One training on this process's rank, from the process group to the declared outputs: a grid or study
    training (images from `prepared`), or a fine-tune (`folder`, `start`; `identity` names both for resuming)."""
    rank, local_rank, world = distributed.init()
    threads = distributed.set_threads(r.train.threads)
    device = distributed.device_for(local_rank)
    distributed.check_precision(r.train.precision, device)
    ckpt_dir = checkpoint.run_dir(Path("checkpoints"), out.name, checkpoint.resume_digest(r.digest() + identity))
    tags = {**tracking.provenance(stage, r.digest(), prepared), **tags,
            "rsb.scale": f"epochs x{params.scale.epochs}, {r.img_size}px, batch {r.batch_size}",
            "rsb.device": device_name(device)}
    tracker = tracking.start(rank == 0, params.experiment, out.name, checkpoint.peek(ckpt_dir).get("mlflow_run_id"),
                             tags)
    resolved = {**r.to_dict(), "digest": r.digest(), "threads": threads, "ds_config": distributed.ds_config(r)}
    tracker.log_params(flatten(resolved))
    tracker.log_datasets(datasets, "training")

    run = Run(r=r, prepared=prepared, ckpt_dir=ckpt_dir, rank=rank, device=device, tracker=tracker, tags=tags,
              folder=folder, start=start)
    t0 = time.perf_counter()
    try:
        model, extra = train(run)
    except BaseException:
        tracker.end("FAILED")
        raise
    metrics = _outputs(run, model, out, time.perf_counter() - t0, extra, resolved) if rank == 0 else {}
    distributed.barrier()
    return metrics


def _outputs(run: Run, model: torch.nn.Module, out: Outputs, seconds: float, extra: dict, resolved: dict) -> dict:
    """Rank 0 writes the declared outputs; the final weights go last (a stage with no model has not finished)."""
    h = run.history
    final = h[-1]
    wall = sum(x.get("train/wall_s", x["train/epoch_s"]) for x in h)  # every epoch, across resumes
    metrics = {"train/loss": final["train/loss"], "val/top1": final.get("val/top1"), "val/top5": final.get("val/top5"),
               "val/count": final.get("val/count"),
               "train/img_per_s": sum(x["train/img_per_s"] for x in h) / len(h),
               "train/time_s": sum(x["train/epoch_s"] for x in h), "train/wall_s": wall, "train/stage_s": seconds,
               "devices": run.r.world_size, "device_hours": run.r.world_size * wall / 3600,
               "epochs": run.r.epochs, "updates": extra["updates_per_epoch"] * run.r.epochs}
    write_csv(out.history, [{k.replace("/", "_"): v for k, v in row.items()} for row in h])
    write_csv(out.updates, run.updates)
    write_json(out.train_metrics, metrics)
    write_json(out.run_file, {"run_id": run.tracker.run_id, "experiment_id": run.tracker.experiment_id,
                              "tags": run.tags, "resolved": resolved})
    save_weights(out.weights, model.state_dict())
    t = run.tracker
    t.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=run.r.epochs)
    artifacts = [(out.run_file, "config"), (out.history, "history"), (out.updates, "history")]
    if out.in_grid:  # a study's weights stay DVC outputs only (100 seeds of ResNet-50 would be 10 GB of artifacts)
        artifacts.append((out.weights, "weights"))
    for path, where in artifacts:
        t.log_artifact(path, where)
    t.end()
    print(f"{out.name}: val top-1 {metrics['val/top1']:.2f}%, {metrics['train/img_per_s']:.0f} img/s, "
          f"{metrics['train/time_s']:.0f} s")
    return metrics


if __name__ == "__main__":
    errors.run(main, errors.rank())  # the launcher stops the other ranks; the line says which one failed, and why
