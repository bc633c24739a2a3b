"""A recipe becomes timm's components, assembled as timm's train.py assembles them; then the epoch loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import distribute_bn

from rsb import checkpoint, distributed, engine, errors, hardware
from rsb import loader as loaders
from rsb.config import ConfigError, Resolved
from rsb.data.datasets import Split, load_classes
from rsb.data.folder import Folder
from rsb.data.folder import check as folder_check
from rsb.models import create_model
from rsb.watchdog import Watchdog

if TYPE_CHECKING:  # the logging is not the math: rsb.tracking stays out of the training's code (rsb.code)
    from rsb.tracking import Tracker


def create_optimizer(model: torch.nn.Module, r: Resolved) -> torch.optim.Optimizer:
    # filter_bias_and_bn (timm's default): no weight decay on 1-D parameters (biases, BN) and model.no_weight_decay()
    return create_optimizer_v2(model, opt=r.recipe.opt, lr=r.lr, weight_decay=r.recipe.weight_decay)


def create_loss(r: Resolved) -> torch.nn.Module:
    """timm train.py's branch (no JSD): under Mixup, BCE with the recipe's threshold or SoftTargetCrossEntropy (label
    smoothing happened in Mixup; BCE's own smoothing applies only to class-index targets, which Mixup never passes);
    without Mixup, smoothing goes to the loss; with neither, plain cross-entropy."""
    rc = r.recipe
    if rc.mixup > 0 or rc.cutmix > 0:
        return BinaryCrossEntropy(target_threshold=rc.bce_target_thresh) if rc.bce_loss else SoftTargetCrossEntropy()
    if rc.smoothing:
        return (
            BinaryCrossEntropy(smoothing=rc.smoothing, target_threshold=rc.bce_target_thresh)
            if rc.bce_loss
            else LabelSmoothingCrossEntropy(smoothing=rc.smoothing)
        )
    return torch.nn.CrossEntropyLoss()


def create_scheduler(optimizer: torch.optim.Optimizer, r: Resolved, updates_per_epoch: int):
    """Cosine with warmup, stepped per update (`scheduler.step_update`), as timm's `--sched-on-updates`."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=r.recipe.sched,
        num_epochs=r.epochs,
        warmup_epochs=r.warmup_epochs,  # type: ignore[arg-type]  # fractional after scaling; timm takes floats
        warmup_lr=r.recipe.warmup_lr,
        min_lr=r.recipe.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


@dataclass
class Run:
    """One (arch, recipe) training: what the loop needs beyond the step."""

    r: Resolved
    prepared: Path
    ckpt_dir: Path
    rank: int
    device: torch.device
    tracker: Tracker
    tags: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    updates: list[dict] = field(default_factory=list)
    folder: Path | None = None  # fine-tuning: a downstream ImageFolder dataset instead of `prepared`
    start: Path | None = None  # fine-tuning: the start's weights (rsb.transfer checked them)
    eval_batch: int = 100  # the validation between epochs: evaluate.batch_size, as the evaluate stage

    def split(self, name: str, transform) -> Split | Folder:
        return Split(self.prepared, name, transform) if self.folder is None else Folder(self.folder, name, transform)

    def num_classes(self) -> int:
        return len(load_classes(self.prepared) if self.folder is None else folder_check(self.folder)["classes"])


def train(run: Run) -> tuple[torch.nn.Module, dict]:
    r = run.r
    dtype = hardware.AUTOCAST[r.train.precision]
    torch.manual_seed(r.train.seed)  # identical initial weights on every rank
    model = create_model(r, run.num_classes(), run.start).to(run.device)
    train_set = run.split("train", loaders.train_transform(r, model))
    val_set = run.split("val", loaders.eval_transform(r.test_img_size, r.recipe.crop_pct, model))
    optimizer = create_optimizer(model, r)
    ds_engine = distributed.initialize(model, optimizer, r)
    if r.train.channels_last:  # after initialize: DeepSpeed's parameter broadcast needs contiguous tensors
        ds_engine.module.to(memory_format=torch.channels_last)
    if r.train.compile:
        ds_engine.compile()
    updates_per_epoch = loaders.MicroBatchSampler(
        train_set, r.micro_batch, r.grad_accum, r.world_size, run.rank, r.recipe.aug_repeats
    ).updates
    if updates_per_epoch == 0:  # a check inside the ranks: RsbError, so one `error:` line there too
        raise ConfigError(
            f"{run.folder or run.prepared}: {len(train_set)} train images make no full update of batch "
            f"{r.batch_size}; lower scale.batch_size"
        )
    step = engine.Step(
        engine=ds_engine,
        loss_fn=create_loss(r),
        mixup_fn=loaders.mixup(r, train_set.num_classes),
        scheduler=create_scheduler(optimizer, r, updates_per_epoch),
        device=run.device,
        dtype=dtype,
        channels_last=r.train.channels_last,
        on_log=lambda rows: _log_updates(run, rows),
    )
    start = _resume(run, step)
    val_shard = torch.utils.data.Subset(val_set, range(run.rank, len(val_set), r.world_size))
    val_loader = loaders.eval_loader(val_shard, run.eval_batch, r.workers)
    # a rank that stops making progress dumps its stacks and stops in one line (rsb.watchdog)
    with Watchdog(r.train.stall_s, errors.rank()) as dog:
        step.beat = dog.beat
        for epoch in range(start, r.epochs):
            began = time.perf_counter()
            slots = engine.Slots(
                ds_engine.module,
                [
                    loaders.stream_seed(r.train.seed, epoch, v)
                    for v in range(run.rank * r.grad_accum, (run.rank + 1) * r.grad_accum)
                ],
                run.device,
            )
            stats = engine.train_one_epoch(
                step,
                loaders.train_loader(train_set, r, run.rank, epoch, run.device, loaders.normalization(model)),
                epoch,
                slots,
                r.grad_accum,
                show_progress=run.rank == 0,
            )
            if r.world_size > 1:
                distribute_bn(ds_engine.module, r.world_size, reduce=True)  # timm's --dist-bn reduce
            last = epoch == r.epochs - 1
            dog.beat()  # an evaluation and a checkpoint each get the whole stall_s
            if last or (r.train.eval_every and (epoch + 1) % r.train.eval_every == 0):
                val = engine.evaluate(ds_engine.module, val_loader, run.device, dtype, r.train.channels_last)
                stats.update({"val/top1": val["top1"], "val/top5": val["top5"], "val/count": val["count"]})
            row = {"epoch": epoch + 1, **stats, "train/wall_s": time.perf_counter() - began}  # the epoch's cost
            run.history.append(row)
            run.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            dog.beat()
            checkpoint.save(ds_engine, run.ckpt_dir, epoch + 1, _client_state(run, step, epoch + 1))
    return ds_engine.module, {"updates_per_epoch": updates_per_epoch}


def _log_updates(run: Run, rows: list[dict]) -> None:
    run.updates.extend({"step": r["step"], "loss": r["loss"], "lr": r["lr"]} for r in rows)
    run.tracker.log_rows(rows, {"loss": "train/loss_step", "lr": "train/lr_step"})


def _client_state(run: Run, step: engine.Step, epochs_done: int) -> dict:
    return {
        "digest": run.ckpt_dir.name,
        "epoch": epochs_done,
        "num_updates": step.num_updates,
        "scheduler": step.scheduler.state_dict(),
        "history": run.history,
        "updates": run.updates,
        "mlflow_run_id": run.tracker.run_id,
    }


def _resume(run: Run, step: engine.Step) -> int:
    client = checkpoint.load(step.engine, run.ckpt_dir, run.ckpt_dir.name)
    if client is None:
        return 0
    step.num_updates = client["num_updates"]
    step.scheduler.load_state_dict(client["scheduler"])
    step.scheduler.step_update(num_updates=step.num_updates)  # the lr of the next update, as the loop leaves it
    run.history[:] = client["history"]
    run.updates[:] = client["updates"]
    if run.rank == 0:
        print(f"resumed {run.ckpt_dir} at epoch {client['epoch']}/{run.r.epochs}")
    return client["epoch"]
