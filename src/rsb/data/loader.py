"""timm's transforms, Mixup/CutMix and repeated-augmentation sampler, assembled as timm's train.py assembles them.

The only addition is `MicroBatchSampler`: the global batch is made of `world x accumulation` micro-batches, and each
micro-batch slot is a *virtual rank* of timm's sampler. One process with 2 accumulation steps therefore sees exactly
the micro-batches that 2 processes see in one step, and repeated augmentation's copies of an image land in different
micro-batches (different BatchNorm batches), as they land on different GPUs in the paper's run.
"""
from __future__ import annotations

import torch
from timm.data import Mixup, create_transform
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rsb.config import Resolved


def train_transform(r: Resolved):
    """timm train.py: RandomResizedCrop (random interpolation), flip, RandAugment; no colour jitter with RandAugment."""
    return create_transform(input_size=r.img_size, is_training=True, hflip=r.recipe.hflip, auto_augment=r.recipe.aa,
                            interpolation="random", re_prob=r.recipe.reprob, color_jitter=0.4)


def eval_transform(test_img_size: int, crop_pct: float):
    """The paper's eval: shorter side to int(size / crop_pct), bicubic, centre crop, ImageNet mean/std."""
    return create_transform(input_size=test_img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)


def mixup(r: Resolved, num_classes: int) -> Mixup:
    """timm train.py's mixup_args; label smoothing happens here, before BCE binarizes the targets."""
    return Mixup(mixup_alpha=r.recipe.mixup, cutmix_alpha=r.recipe.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                 label_smoothing=r.recipe.smoothing, num_classes=num_classes)


class MicroBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches: slot k of each update comes from virtual rank `rank * accum + k`."""

    def __init__(self, dataset: Dataset, micro_batch: int, accum: int, world: int, rank: int, aug_repeats: int,
                 seed: int = 0):
        virtual = world * accum
        self.micro_batch, self.epoch = micro_batch, 0
        self.samplers = [RepeatAugSampler(dataset, num_replicas=virtual, rank=v, num_repeats=aug_repeats)
                         if aug_repeats else
                         DistributedSampler(dataset, num_replicas=virtual, rank=v, shuffle=True, seed=seed)
                         for v in range(rank * accum, (rank + 1) * accum)]
        self.updates = min(len(s) for s in self.samplers) // micro_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.samplers:
            s.set_epoch(epoch)

    def __iter__(self):
        streams = [list(s) for s in self.samplers]
        for u in range(self.updates):
            for stream in streams:
                yield stream[u * self.micro_batch:(u + 1) * self.micro_batch]

    def __len__(self) -> int:
        return self.updates * len(self.samplers)


def train_loader(dataset: Dataset, r: Resolved, rank: int, epoch: int, pin_memory: bool) -> DataLoader:
    """A fresh loader per epoch, its worker seeds a function of (seed, rank, epoch): resuming is deterministic."""
    sampler = MicroBatchSampler(dataset, r.micro_batch, r.grad_accum, r.world_size, rank, r.recipe.aug_repeats,
                                seed=r.train.seed)
    sampler.set_epoch(epoch)
    g = torch.Generator()
    g.manual_seed(r.train.seed * 1_000_003 + rank * 10_007 + epoch)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=r.train.workers, pin_memory=pin_memory,
                      generator=g, persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
