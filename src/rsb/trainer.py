"""One training job on this process's rank, end to end: the process group, the device, the MLflow run, the
epoch loop (rsb.training), and the declared outputs that rank 0 writes last.

`train_recipe` is the grid's and the studies' training (stages.train); rsb.finetune runs a fine-tune through the
same `train_job`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rsb import checkpoint, distributed, errors, hardware, tracking
from rsb.config import ConfigError, Params, Resolved, flatten, resolve
from rsb.data.datasets import load_classes
from rsb.io import refuse_overlap, save_weights, write_csv, write_json
from rsb.outputs import EMA_STUDY, Outputs
from rsb.training import Run, train


def world_size(params: Params) -> int:
    """The launcher's world (WORLD_SIZE), or the one params.yaml asks for when the stage runs without a launcher."""
    return int(os.environ.get("WORLD_SIZE", params.train.devices * params.train.nodes))


@dataclass(frozen=True)
class Job:
    """One training, described once: which stage it is, what it is called and tagged, and where its images are."""

    stage: str  # the DVC stage (train@<name>, a study's, or a fine-tune's)
    out: Outputs  # the files it writes
    tags: dict  # what kind of run (rsb.kind, arch, recipe, seed, ...): MLflow tags
    datasets: tuple[dict, ...]  # MLflow dataset inputs
    prepared: Path  # data/prepared: the images (grid, studies) and the provenance tags (all)
    experiment: str  # the MLflow experiment
    eval_batch: int  # the validation between epochs' batch (evaluate.batch_size)
    folder: Path | None = None  # fine-tuning: a downstream ImageFolder set instead of the prepared index
    start: Path | None = None  # fine-tuning: the start's weights (rsb.transfer checked them)
    identity: str = ""  # what else the resume digest covers (a fine-tune's start and dataset)
    module: str = __name__  # the module that runs it, whose code (rsb.code) a checkpoint must match


def train_recipe(params: Params, arch: str, recipe: str, study: str | None = None, seed: int | None = None) -> dict:
    """train@<arch>-<recipe> (or a study's run of it, `study`/`seed`): the recipe resolved for this world, checked
    against the prepared data, then `train_job`."""
    out = Outputs.of(arch, recipe, study, seed)
    r = resolve(params, arch, recipe, world_size=world_size(params), seed=seed)
    prepared = Path(params.data.prepared)
    refuse_overlap(out.training_outputs(), {"data.prepared": prepared, "data.raw": Path(params.data.raw)})
    load_classes(prepared)  # fails clearly before any process group work if prepare has not run
    tags = {
        "rsb.kind": "train",
        "rsb.arch": arch,
        "rsb.recipe": recipe,
        "rsb.study": out.study,
        "rsb.seed": str(r.train.seed),
    }
    job = Job(
        stage=f"train@{out.name}",
        out=out,
        tags=tags,
        prepared=prepared,
        experiment=params.experiment,
        datasets=tuple(tracking.datasets(prepared, params.data.raw, ("train",))),
        eval_batch=params.evaluate.batch_size,
    )
    return train_job(job, r)


def train_job(job: Job, r: Resolved) -> dict:
    """One training on this process's rank, from the process group to the declared outputs: a grid or study
    training (images from `job.prepared`), or a fine-tune (`job.folder`, `job.start`)."""
    if r.recipe.model_ema and job.out.study != EMA_STUDY:
        raise ConfigError(
            f"recipes.{r.recipe_name}.model_ema: true, but only the {EMA_STUDY} study's stages declare a model "
            f"EMA's weights ({job.stage} does not); set it false, or train {r.recipe_name} in "
            f"studies/dvc.yaml:{EMA_STUDY}-train"
        )
    rank, local_rank, _ = distributed.init()
    threads = distributed.set_threads(r.train.threads)
    device = hardware.device_for(local_rank)
    hardware.checked_precision(r.train.precision, device)  # fp16 on a CPU fails before any work
    out = job.out
    ckpt_dir = checkpoint.run_dir(
        Path("checkpoints"), out.name, checkpoint.resume_digest(r.digest() + job.identity, job.module)
    )
    tags = {
        **tracking.provenance(job.stage, r.digest(), job.prepared),
        **job.tags,
        "rsb.scale": f"epochs x{r.scale.epochs}, {r.img_size}px, batch {r.batch_size}",
        "rsb.device": hardware.device_name(device),
        "rsb.slot": os.environ.get("RSB_SLOT", "the whole node"),  # rsb.claim (train.slots)
    }
    tracker = tracking.start(rank == 0, job.experiment, out.name, checkpoint.peek(ckpt_dir).get("mlflow_run_id"), tags)
    resolved = {**r.to_dict(), "digest": r.digest(), "threads": threads, "ds_config": distributed.ds_config(r)}
    tracker.log_params(flatten(resolved))
    tracker.log_datasets(list(job.datasets), "training")

    run = Run(
        r=r,
        prepared=job.prepared,
        ckpt_dir=ckpt_dir,
        rank=rank,
        device=device,
        tracker=tracker,
        tags=tags,
        folder=job.folder,
        start=job.start,
        eval_batch=job.eval_batch,
    )
    t0 = time.perf_counter()
    try:
        model, extra = train(run)
    except errors.Stopped:
        tracker.end("KILLED")  # MLflow's status for a run stopped from outside; the resume sets it RUNNING again
        raise
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
    metrics = {
        "train/loss": final["train/loss"],
        "val/top1": final.get("val/top1"),
        "val/top5": final.get("val/top5"),
        "val/count": final.get("val/count"),
        "train/img_per_s": sum(x["train/img_per_s"] for x in h) / len(h),
        "train/time_s": sum(x["train/epoch_s"] for x in h),
        "train/wall_s": wall,
        "train/stage_s": seconds,
        "devices": run.r.world_size,
        "device_hours": run.r.world_size * wall / 3600,
        "epochs": run.r.epochs,
        "updates": extra["updates_per_epoch"] * run.r.epochs,
    }
    write_csv(out.history, [{k.replace("/", "_"): v for k, v in row.items()} for row in h])
    write_csv(out.updates, run.updates)
    write_json(out.train_metrics, metrics)
    write_json(
        out.run_file,
        {
            "run_id": run.tracker.run_id,
            "experiment_id": run.tracker.experiment_id,
            "tags": run.tags,
            "resolved": resolved,
        },
    )
    if out.study == EMA_STUDY:
        _export_ema(out, extra["ema"], run.r, extra["updates_per_epoch"] * run.r.epochs)
    save_weights(out.weights, model.state_dict())
    t = run.tracker
    t.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=run.r.epochs)
    artifacts = [(out.run_file, "config"), (out.history, "history"), (out.updates, "history")]
    if out.study == EMA_STUDY:
        artifacts.append((out.ema_dir / "ema.json", "ema"))
    if out.in_grid:  # a study's weights stay DVC outputs only (100 seeds of ResNet-50 would be 10 GB of artifacts)
        artifacts.append((out.weights, "weights"))
    for path, where in artifacts:
        t.log_artifact(path, where)
    t.end()
    print(
        f"{out.name}: val top-1 {metrics['val/top1']:.2f}%, {metrics['train/img_per_s']:.0f} img/s, "
        f"{metrics['train/time_s']:.0f} s"
    )
    return metrics


def _export_ema(out: Outputs, ema, r: Resolved, updates: int) -> None:
    """The EMA's own weights (rank 0's, as DeiT saves it) and what it is, in the study's declared EMA folder."""
    import shutil

    shutil.rmtree(out.ema_dir, ignore_errors=True)  # the stage's own folder (DVC removes it before a rerun too)
    info: dict = {"model_ema": ema is not None}
    if ema is not None:
        info.update(
            {
                "class": "timm.utils.ModelEma (DeiT main.py's)",
                "decay": r.recipe.model_ema_decay,
                "decay_per_update": ema.decay,
                "updates": updates,
                "device": "cpu" if r.recipe.model_ema_force_cpu else "the model's",
            }
        )
        save_weights(out.ema_weights, ema.ema.state_dict())
    write_json(out.ema_dir / "ema.json", info)
