"""The two loops: `train_one_epoch` and `evaluate`, each returning a dict of averaged numbers."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from rsb import watchdog
from rsb.errors import RsbError
from rsb.hardware import autocast


class NonFiniteLoss(RsbError, FloatingPointError):
    """Training diverged: the last good checkpoint is left as it was."""


@dataclass
class Step:
    """What one training step needs, built once per run."""

    engine: Any  # deepspeed.DeepSpeedEngine
    loss_fn: Callable
    mixup_fn: Callable | None
    scheduler: Any  # timm scheduler, stepped per update here (never by DeepSpeed)
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    channels_last: bool = True
    num_updates: int = 0
    log_every: int = 10
    on_log: Callable[[list[dict]], None] = field(default=lambda rows: None)
    beat: Callable[[int], None] = field(default=lambda update: None)  # rsb.watchdog: progress, per micro-batch
    ema: Any = None  # timm's ModelEma (DeiT's --model-ema), updated after each update

    def autocast(self):
        return autocast(self.device, self.dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x


class Slots:
    """What would live in separate processes, for the micro-batch slots (virtual ranks) one process accumulates:
    each slot's random streams (Python, NumPy, torch: Mixup's draws and drop path) and, with more than one slot,
    its BatchNorm running statistics and batch counters. `reduce_bn` then averages the statistics as timm's
    `distribute_bn(reduce=True)` averages ranks (the counters, equal in every slot, are a process's own count), so
    one process accumulating k micro-batches ends an epoch where k processes end it."""

    def __init__(self, model: torch.nn.Module, seeds: list[int], device: torch.device):
        from rsb.loader import seed_all

        self.device = device
        # the buffers timm's distribute_bn reduces, then the counters it leaves alone (BatchNorm's
        # num_batches_tracked: the averaging factor of a BatchNorm with momentum=None)
        named = list(model.named_buffers())
        self.bn = [b for n, b in named if "running_mean" in n or "running_var" in n]
        self.reduced = len(self.bn)
        self.bn += [b for n, b in named if n.endswith("num_batches_tracked")]
        # (none for models without BatchNorm, e.g. ViT/DeiT: nothing to keep apart)
        self.saved_bn = [[b.clone() for b in self.bn] for _ in seeds] if len(seeds) > 1 and self.bn else None
        self.rng = []
        for s in seeds:
            seed_all(s)
            self.rng.append(self._rng_state())

    def _rng_state(self):
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda

    def enter(self, k: int) -> None:
        py, npy, cpu, cuda = self.rng[k]
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)
        if self.saved_bn is not None:
            torch._foreach_copy_(self.bn, self.saved_bn[k])

    def leave(self, k: int) -> None:
        self.rng[k] = self._rng_state()
        if self.saved_bn is not None:
            torch._foreach_copy_(self.saved_bn[k], self.bn)

    def state(self) -> list[dict]:
        """Each slot's random streams and BatchNorm statistics, as a checkpoint holds them inside an epoch (plain
        ints and tensors: it loads with torch.load(weights_only=True))."""
        out = []
        for k, (py, npy, cpu, cuda) in enumerate(self.rng):
            bn = self.saved_bn[k] if self.saved_bn is not None else self.bn
            out.append(
                {
                    "python": py,
                    "numpy": (torch.from_numpy(npy[1].astype(np.int64)), *map(_plain, npy[2:])),
                    "torch": cpu.clone(),
                    "cuda": None if cuda is None else cuda.clone(),
                    "bn": [b.detach().clone().cpu() for b in bn],
                }
            )
        return out

    def restore(self, states: list[dict]) -> None:
        """The inverse of `state`: the streams and statistics each slot had at the checkpoint's update."""
        assert len(states) == len(self.rng), (len(states), len(self.rng))
        for k, st in enumerate(states):
            keys, pos, has_gauss, gauss = st["numpy"]
            npy = ("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
            py = st["python"]
            self.rng[k] = (py[0], tuple(py[1]), py[2]), npy, st["torch"], st["cuda"]
            with torch.no_grad():
                target = self.saved_bn[k] if self.saved_bn is not None else self.bn
                torch._foreach_copy_(target, [b.to(t.device) for b, t in zip(st["bn"], target)])

    def first_slots_bn(self) -> None:
        """Slot 0's BatchNorm statistics into the model, between updates (the process's rank's own, where its
        slots were separate processes: what a model EMA of that rank reads)."""
        if self.saved_bn is not None:
            torch._foreach_copy_(self.bn, self.saved_bn[0])

    def reduce_bn(self) -> None:
        if self.saved_bn is not None:
            for i, b in enumerate(self.bn):
                b.copy_(
                    torch.stack([saved[i] for saved in self.saved_bn]).mean(0)
                    if i < self.reduced
                    else self.saved_bn[0][i]
                )


def _plain(x):
    """A NumPy scalar as the Python number it holds."""
    return x.item() if hasattr(x, "item") else x


def forward_backward(s: Step, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """One micro-step: forward and loss under autocast (as timm's train.py), backward through DeepSpeed, which
    scales by 1/accumulation and all-reduces on the update boundary; `engine.step()` updates only there."""
    with s.autocast():
        loss = s.loss_fn(s.engine(images), targets)
    s.engine.backward(loss)
    s.engine.step()
    return loss.detach()


def train_one_epoch(
    s: Step,
    loader,
    epoch: int,
    slots: Slots,
    accum: int,
    show_progress: bool,
    done: list[dict] | None = None,
    boundary: Callable[[EpochLog], None] | None = None,
) -> dict:
    """Micro-batch i is slot i % accum: it runs with that slot's random streams and BatchNorm statistics. `done`:
    the rows of this epoch's updates before a resume inside it (the loader starts after them); `boundary` runs after
    every update (a checkpoint on schedule or on a stop signal: rsb.training)."""
    s.engine.train()
    log = EpochLog(s, epoch, list(done or []), len(loader) // accum, show_progress)
    try:  # the bar is closed on a failure too, so an error line is not printed after it
        for i, (images, labels) in enumerate(loader):
            slots.enter(i % accum)
            images, labels = s.to_device(images), labels.to(s.device, non_blocking=True)
            if s.mixup_fn is not None:
                images, labels = s.mixup_fn(images, labels)
            log.pending.append(forward_backward(s, images, labels))
            s.beat(s.num_updates)
            slots.leave(i % accum)
            log.seen += images.shape[0]
            if (i + 1) % accum:
                continue
            lr = s.engine.optimizer.param_groups[0]["lr"]  # the lr this update used
            s.num_updates += 1
            s.scheduler.step_update(num_updates=s.num_updates)
            if s.ema is not None:  # DeiT's engine: model_ema.update(model) after each optimizer step
                slots.first_slots_bn()
                s.ema.update(s.engine.module)
            log.add({"step": s.num_updates, "lr": lr, "loss": torch.stack(log.pending).mean()})
            if boundary is not None:
                boundary(log)
        log.flush()
    finally:
        log.bar.close()
    slots.reduce_bn()
    rows, elapsed = log.rows, time.perf_counter() - log.t0
    return {
        "train/loss": sum(r["loss"] for r in rows) / max(1, len(rows)),
        "train/lr": rows[-1]["lr"] if rows else 0.0,
        "train/img_per_s": log.seen / elapsed,
        "train/epoch_s": elapsed,
        "train/updates": len(rows),
    }


class EpochLog:
    """One epoch's update rows. Loss tensors become numbers in windows of `log_every` (one sync per window, not per
    update), checked finite there, and go to `on_log`; `flush` turns the rest into numbers now (before a
    checkpoint, which holds them)."""

    def __init__(self, s: Step, epoch: int, done: list[dict], remaining: int, show_progress: bool):
        self.s, self.epoch, self.rows, self.flushed = s, epoch, done, len(done)
        self.pending: list[torch.Tensor] = []
        self.seen, self.t0 = 0, time.perf_counter()
        self.bar = tqdm(
            total=len(done) + remaining,
            initial=len(done),
            desc=f"epoch {epoch}",
            disable=not show_progress,
            leave=False,
            dynamic_ncols=True,
        )

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.pending = []
        self.bar.update(1)
        if len(self.rows) - self.flushed >= self.s.log_every:
            self.flush()

    def flush(self) -> None:
        """Each row's loss is the mean over the whole global batch: averaged over this rank's slots, then over
        ranks. Collective: every rank flushes at the same updates."""
        rows = self.rows[self.flushed :]
        if not rows:
            return
        values = torch.stack([r["loss"] for r in rows]).float()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
            values /= dist.get_world_size()
        numbers = values.cpu().tolist()
        for r, v in zip(rows, numbers):
            r["loss"] = v
            if not math.isfinite(v):
                raise NonFiniteLoss(
                    f"non-finite loss {v} at update {r['step']} (epoch {self.epoch}); the last good "
                    "checkpoint is kept. Lower the lr or use precision fp32/bf16"
                )
        self.flushed = len(self.rows)
        img_per_s = self.seen / (time.perf_counter() - self.t0)
        self.bar.set_postfix(loss=f"{numbers[-1]:.4f}", lr=f"{rows[-1]['lr']:.2e}", img_s=f"{img_per_s:.0f}")
        self.s.on_log(rows)


@torch.no_grad()
def predict(
    model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None, channels_last: bool, k: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k class indices and labels for every sample of `loader`, in order."""
    model.eval()
    tops, labels = [], []
    for i, (images, y) in enumerate(loader):
        watchdog.beat(i)  # the stage's watchdog (rsb.watchdog.stage): a batch arrived
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, dtype):
            logits = model(images)
        tops.append(logits.float().topk(k, dim=1).indices.cpu())
        labels.append(y)
    return torch.cat(tops), torch.cat(labels)


def topk_correct(top: torch.Tensor, labels: torch.Tensor) -> dict[str, int]:
    """Images whose label is the first prediction (top1) or among the first five (top5): the one top-k rule, for the
    validation between epochs and for the evaluate stage's val and V2 (ReaL's rule: rsb.evaluation)."""
    hit = top == labels[:, None]
    return {"top1": int(hit[:, :1].any(1).sum()), "top5": int(hit[:, :5].any(1).sum()), "count": len(labels)}


def evaluate(
    model: torch.nn.Module, loader, device: torch.device, dtype: torch.dtype | None, channels_last: bool
) -> dict[str, float]:
    """Top-1/top-5 in percent over `loader`; summed over ranks when each rank holds a shard."""
    top, labels = predict(model, loader, device, dtype, channels_last, k=min(5, _num_classes(model)))
    c = topk_correct(top, labels)
    counts = torch.tensor([c["top1"], c["top5"], c["count"]], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "count": int(n)}


def _num_classes(model: torch.nn.Module) -> int:
    return getattr(model, "num_classes", 1000)
