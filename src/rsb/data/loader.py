"""timm's transforms, Mixup/CutMix and repeated-augmentation sampler, assembled as timm's train.py assembles them.

The one addition is the *virtual rank*. The global batch is `world x accumulation` micro-batches; micro-batch slot k
of rank r is virtual rank v = r * accumulation + k. It draws its indices from timm's sampler with
num_replicas = world x accumulation and rank v, and its randomness (augmentation here, Mixup and drop path in
`rsb.engine.Slots`) from a stream of its own. One process accumulating k micro-batches therefore computes exactly
what k processes compute, and repeated augmentation's copies of an image land in different micro-batches (different
BatchNorm batches), as they land on different GPUs in the paper's run.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rsb import compat
from rsb.config import Resolved


compat.posterize_with_zero_bits()  # before any transform is built (see rsb.compat)


def normalization(model: torch.nn.Module) -> dict:
    """The model's own mean and std, as train.py and validate.py take them (`resolve_data_config`): ImageNet's for
    ResNets and DeiT, (0.5, 0.5, 0.5) for others (ViT, Inception)."""
    cfg = resolve_data_config({}, model=model)
    return {"mean": cfg["mean"], "std": cfg["std"]}


def train_transform(r: Resolved, model: torch.nn.Module):
    """timm train.py's create_loader arguments (no prefetcher): RandomResizedCrop with train.py's default scale and
    ratio and the recipe's interpolation (train.py's default: random), flip, RandAugment (which turns colour jitter
    off), random erasing."""
    return create_transform(input_size=r.img_size, is_training=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            hflip=r.recipe.hflip, vflip=0.0, color_jitter=0.4, auto_augment=r.recipe.aa,
                            interpolation=r.recipe.train_interpolation, re_prob=r.recipe.reprob, re_mode="pixel",
                            re_count=1,
                            **normalization(model))


def eval_transform(test_img_size: int, crop_pct: float, model: torch.nn.Module):
    """The paper's eval: shorter side to int(size / crop_pct), bicubic, centre crop, the model's mean/std."""
    return create_transform(input_size=test_img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct,
                            **normalization(model))


def mixup(r: Resolved, num_classes: int) -> Mixup | None:
    """timm train.py's mixup_args; label smoothing happens here, before the loss. None when the recipe mixes nothing
    (train.py then hands the loss class indices)."""
    if not (r.recipe.mixup > 0 or r.recipe.cutmix > 0):
        return None
    return Mixup(mixup_alpha=r.recipe.mixup, cutmix_alpha=r.recipe.cutmix, cutmix_minmax=None, prob=1.0,
                 switch_prob=0.5, mode="batch", label_smoothing=r.recipe.smoothing, num_classes=num_classes)


def stream_seed(seed: int, epoch: int, virtual_rank: int) -> int:
    """The seed of one virtual rank's randomness in one epoch. Per epoch, so a run resumed at an epoch boundary
    continues exactly as the uninterrupted one; per virtual rank, so it does not depend on the world shape."""
    return (seed * 1_000_003 + virtual_rank * 10_007 + epoch) % 2**31


def sample_seed(stream: int, position: int) -> int:
    """The augmentation seed of the sample at `position` of a virtual rank's stream: independent of which worker
    process decodes it, so augmentation is a function of (seed, epoch, virtual rank, position) alone."""
    return int.from_bytes(hashlib.blake2b(f"{stream}:{position}".encode(), digest_size=4).digest(), "little")


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's generators (timm's transforms draw from all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def virtual_sampler(dataset: Dataset, virtual: int, v: int, aug_repeats: int) -> Sampler[int]:
    """timm create_loader's training sampler for rank v of `virtual` replicas (seeds and shuffling as timm's)."""
    if aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=virtual, rank=v, num_repeats=aug_repeats)
    return DistributedSampler(dataset, num_replicas=virtual, rank=v)


class MicroBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches, as lists of (dataset index, augmentation seed): update u, slot k holds positions
    [u*micro, (u+1)*micro) of virtual rank `rank * accum + k`."""

    def __init__(self, dataset: Dataset, micro_batch: int, accum: int, world: int, rank: int, aug_repeats: int,
                 seed: int = 0):
        self.micro_batch, self.seed, self.epoch = micro_batch, seed, 0
        self.ranks = range(rank * accum, (rank + 1) * accum)
        self.samplers = [virtual_sampler(dataset, world * accum, v, aug_repeats) for v in self.ranks]
        self.updates = min(len(s) for s in self.samplers) // micro_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.samplers:
            s.set_epoch(epoch)

    def __iter__(self):
        streams = [list(s) for s in self.samplers]
        seeds = [stream_seed(self.seed, self.epoch, v) for v in self.ranks]
        for u in range(self.updates):
            positions = range(u * self.micro_batch, (u + 1) * self.micro_batch)
            for stream, s in zip(streams, seeds):
                yield [(stream[p], sample_seed(s, p)) for p in positions]

    def __len__(self) -> int:
        return self.updates * len(self.samplers)


class Seeded(Dataset):
    """Yields dataset[i] with the generators seeded from the sample's own seed (see `sample_seed`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        seed_all(seed)
        return self.dataset[index]


def train_loader(dataset: Dataset, r: Resolved, rank: int, epoch: int, pin_memory: bool) -> DataLoader:
    """A fresh loader per epoch over this rank's micro-batches; augmentation does not depend on the worker count."""
    sampler = MicroBatchSampler(dataset, r.micro_batch, r.grad_accum, r.world_size, rank, r.recipe.aug_repeats,
                                seed=r.train.seed)
    sampler.set_epoch(epoch)
    return DataLoader(Seeded(dataset), batch_sampler=sampler, num_workers=r.train.workers, pin_memory=pin_memory,
                      persistent_workers=False)


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
