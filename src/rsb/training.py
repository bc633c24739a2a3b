"""A recipe becomes timm's components, assembled as timm's train.py assembles them; then the epoch loop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEma, distribute_bn

from rsb import checkpoint, distributed, engine, errors, hardware, stopping
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
    ema: Any = None  # timm's ModelEma when the recipe keeps one (rank 0's is saved and exported)

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
    # DeiT main.py: the EMA is made after the model is on its device, before the DDP wrapper (here: compile)
    ema = None
    if r.recipe.model_ema:  # the decay is set below, once the run's update count is known
        ema = ModelEma(ds_engine.module, decay=1.0, device="cpu" if r.recipe.model_ema_force_cpu else "")
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
    if ema is not None:
        ema.decay = r.ema_decay(updates_per_epoch * r.epochs)
        step.ema = run.ema = ema
    resumed = _resume(run, step)
    val_shard = torch.utils.data.Subset(val_set, range(run.rank, len(val_set), r.world_size))
    val_loader = loaders.eval_loader(val_shard, run.eval_batch, r.workers)
    # a rank that stops making progress dumps its stacks and stops in one line (rsb.watchdog); a stop signal saves
    # at the next update and stops (rsb.stopping)
    with Watchdog(r.train.stall_s, errors.rank()) as dog, stopping.StopSignals() as signals:
        step.beat = dog.beat
        agree = stopping.Agreement(signals, r.train.checkpoint_every)
        for epoch in range(resumed.epoch, r.epochs):
            began = time.perf_counter()
            slots = engine.Slots(
                ds_engine.module,
                [loaders.stream_seed(r.train.seed, epoch, v) for v in _virtual_ranks(run)],
                run.device,
            )
            inside = resumed.epoch == epoch and resumed.position > 0  # a resume inside this epoch
            if inside:
                slots.restore([resumed.slots[v] for v in _virtual_ranks(run)])
            at = Boundary(run, step, agree, slots, epoch, updates_per_epoch, resumed.wall_s if inside else 0.0)
            stats = engine.train_one_epoch(
                step,
                loaders.train_loader(
                    train_set,
                    r,
                    run.rank,
                    epoch,
                    run.device,
                    loaders.normalization(model),
                    start=resumed.position if inside else 0,
                ),
                epoch,
                slots,
                r.grad_accum,
                show_progress=run.rank == 0,
                done=resumed.rows if inside else None,
                boundary=at,
            )
            if r.world_size > 1:
                distribute_bn(ds_engine.module, r.world_size, reduce=True)  # timm's --dist-bn reduce
            last = epoch == r.epochs - 1
            dog.beat()  # an evaluation and a checkpoint each get the whole stall_s
            if last or (r.train.eval_every and (epoch + 1) % r.train.eval_every == 0):
                val = engine.evaluate(ds_engine.module, val_loader, run.device, dtype, r.train.channels_last)
                stats.update({"val/top1": val["top1"], "val/top5": val["top5"], "val/count": val["count"]})
            wall = time.perf_counter() - began + (resumed.wall_s if inside else 0.0)
            row = {"epoch": epoch + 1, **stats, "train/wall_s": wall}  # the epoch's cost, across a resume inside it
            run.history.append(row)
            run.tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            dog.beat()
            tag = checkpoint.tag_for(epoch + 1)
            checkpoint.save(ds_engine, run.ckpt_dir, tag, _client_state(run, step, epoch + 1), r.train.keep_checkpoints)
            agree.saved()
            if not last and agree.decide(step.num_updates)[1]:  # a signal during the evaluation or the save
                raise _stopped(run, signals, step, tag)
    return ds_engine.module, {"updates_per_epoch": updates_per_epoch, "ema": ema}


def _virtual_ranks(run: Run) -> range:
    return range(run.rank * run.r.grad_accum, (run.rank + 1) * run.r.grad_accum)


class Boundary:
    """After each update of an epoch: a checkpoint inside the epoch when the schedule or a stop signal asks (agreed
    by every rank), then the stop. At the epoch's last update nothing is saved here: the epoch's own checkpoint
    follows, and a stop then happens after it."""

    def __init__(
        self,
        run: Run,
        step: engine.Step,
        agree: stopping.Agreement,
        slots: engine.Slots,
        epoch: int,
        n: int,
        before: float = 0.0,
    ):
        self.run, self.step, self.agree, self.slots, self.epoch, self.n = run, step, agree, slots, epoch, n
        self.began = time.perf_counter() - before  # the epoch's time before a resume inside it counts too

    def __call__(self, log: engine.EpochLog) -> None:
        position = len(log.rows)
        if position >= self.n:
            return
        save, stop = self.agree.decide(self.step.num_updates)
        if not save:
            return
        log.flush()  # the rows' losses as numbers (and checked finite) before a checkpoint holds them
        run = self.run
        states: dict[int, dict] = {}
        for part in self.agree.gather(dict(zip(_virtual_ranks(run), self.slots.state()))):
            states.update(part)
        client = {
            **_client_state(run, self.step, self.epoch),
            "position": position,
            "epoch_rows": log.rows,
            "slots": states,
            "epoch_wall_s": time.perf_counter() - self.began,
        }
        self.step.beat(self.step.num_updates)
        tag = checkpoint.tag_for(self.epoch, position)
        checkpoint.save(self.step.engine, run.ckpt_dir, tag, client, run.r.train.keep_checkpoints)
        self.step.beat(self.step.num_updates)
        self.agree.saved()
        if stop:
            raise _stopped(run, self.agree.signals, self.step, tag)


def _stopped(run: Run, signals: stopping.StopSignals, step: engine.Step, tag: str) -> errors.Stopped:
    why = signals.received or "a peer's stop signal"
    return errors.Stopped(
        f"{errors.rank()}: {why} at update {step.num_updates}: the checkpoint {run.ckpt_dir / tag} is saved; "
        "the same command resumes from it (rsb.launch's SLURM path requeues the job)"
    )


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
        "model_ema": None if run.ema is None else run.ema.ema.state_dict(),
    }


@dataclass
class Resumed:
    """Where a run continues: at epoch `epoch`, `position` updates into it (0: at its start)."""

    epoch: int = 0
    position: int = 0
    rows: list[dict] = field(default_factory=list)  # the epoch's update rows before `position`
    slots: dict[int, dict] = field(default_factory=dict)  # each virtual rank's streams and BatchNorm statistics
    wall_s: float = 0.0  # the epoch's time before the checkpoint


def _resume(run: Run, step: engine.Step) -> Resumed:
    client = checkpoint.load(step.engine, run.ckpt_dir, run.ckpt_dir.name)
    if client is None:
        return Resumed()
    step.num_updates = client["num_updates"]
    step.scheduler.load_state_dict(client["scheduler"])
    step.scheduler.step_update(num_updates=step.num_updates)  # the lr of the next update, as the loop leaves it
    run.history[:] = client["history"]
    run.updates[:] = client["updates"]
    if run.ema is not None:  # DeiT main.py: _load_checkpoint_for_ema(model_ema, checkpoint['model_ema'])
        run.ema.ema.load_state_dict(client["model_ema"])
    position = client.get("position", 0)
    if run.rank == 0:
        where = f" + {position} updates" if position else ""
        print(f"resumed {run.ckpt_dir} at epoch {client['epoch']}/{run.r.epochs}{where}")
    return Resumed(
        client["epoch"], position, client.get("epoch_rows", []), client.get("slots", {}), client.get("epoch_wall_s", 0)
    )
