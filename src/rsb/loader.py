"""timm's transforms, Mixup/CutMix and repeated-augmentation sampler, assembled as timm's train.py assembles them.

The one addition is the *virtual rank*. The global batch is `world x accumulation` micro-batches; micro-batch slot k
of rank r is virtual rank v = r * accumulation + k. It draws its indices from timm's sampler with
num_replicas = world x accumulation and rank v, and its randomness (augmentation here, Mixup and drop path in
`rsb.engine.Slots`) from a stream of its own. One process accumulating k micro-batches therefore computes exactly
what k processes compute, and repeated augmentation's copies of an image land in different micro-batches (different
BatchNorm batches), as they land on different GPUs in the paper's run.

Two data paths, as train.py has them (`train.prefetcher`): without the prefetcher, workers yield normalized float
images (random erasing per image) and Mixup/CutMix mixes the float batch in the training step; with it (train.py's
default on a GPU), workers yield uint8 images, `FastCollateMixup` mixes them while collating, and timm's
`PrefetchLoader` moves the batch to the device, normalizes it and erases there. Its draws follow docs/seeds.md.
"""

from __future__ import annotations

import hashlib
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from timm.data import FastCollateMixup, Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.loader import PrefetchLoader, fast_collate
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

if TYPE_CHECKING:
    from rsb.data.datasets import Split
    from rsb.data.folder import Folder

from rsb import compat
from rsb.config import Resolved
from rsb.errors import RsbError

compat.posterize_with_zero_bits()  # before any transform is built (see rsb.compat)


def normalization(model: torch.nn.Module) -> dict:
    """The model's own mean and std, as train.py and validate.py take them (`resolve_data_config`): ImageNet's for
    ResNets and DeiT, (0.5, 0.5, 0.5) for others (ViT, Inception)."""
    cfg = resolve_data_config({}, model=model)
    return {"mean": cfg["mean"], "std": cfg["std"]}


def train_transform(r: Resolved, model: torch.nn.Module):
    """timm train.py's create_loader arguments: RandomResizedCrop with train.py's default scale and ratio and the
    recipe's interpolation (train.py's default: random), flip, RandAugment (which turns colour jitter off); without
    the prefetcher also ToTensor, normalization and random erasing, with it a uint8 array (the rest on the device)."""
    return create_transform(
        input_size=r.img_size,
        is_training=True,
        scale=(0.08, 1.0),
        ratio=(3 / 4, 4 / 3),
        hflip=r.recipe.hflip,
        vflip=0.0,
        color_jitter=0.4,
        auto_augment=r.recipe.aa,
        interpolation=r.recipe.train_interpolation,
        re_prob=r.recipe.reprob,
        re_mode="pixel",
        re_count=1,
        use_prefetcher=r.prefetcher,
        **normalization(model),
    )


def eval_transform(test_img_size: int, crop_pct: float, model: torch.nn.Module):
    """The paper's eval: shorter side to int(size / crop_pct), bicubic, centre crop, the model's mean/std."""
    return create_transform(
        input_size=test_img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct, **normalization(model)
    )


def mixup_args(r: Resolved, num_classes: int) -> dict | None:
    """timm train.py's mixup_args; label smoothing happens in Mixup, before the loss. None when the recipe mixes
    nothing (train.py then hands the loss class indices)."""
    if not (r.recipe.mixup > 0 or r.recipe.cutmix > 0):
        return None
    return dict(
        mixup_alpha=r.recipe.mixup,
        cutmix_alpha=r.recipe.cutmix,
        cutmix_minmax=None,
        prob=1.0,
        switch_prob=0.5,
        mode="batch",
        label_smoothing=r.recipe.smoothing,
        num_classes=num_classes,
    )


def mixup(r: Resolved, num_classes: int) -> Mixup | None:
    """The training step's Mixup/CutMix on the float batch: without the prefetcher only (train.py's `mixup_fn`)."""
    args = mixup_args(r, num_classes)
    return Mixup(**args) if args and not r.prefetcher else None


def collate(r: Resolved, num_classes: int):
    """The loader's collate: train.py's `FastCollateMixup(**mixup_args)` with the prefetcher and a recipe that
    mixes, create_loader's `fast_collate` with the prefetcher alone, else torch's default."""
    if not r.prefetcher:
        return torch.utils.data.default_collate
    args = mixup_args(r, num_classes)
    return FastCollateMixup(**args) if args else fast_collate


def stream_seed(seed: int, epoch: int, virtual_rank: int) -> int:
    """The seed of one virtual rank's randomness in one epoch. Per epoch, so a run resumed at an epoch boundary
    continues exactly as the uninterrupted one; per virtual rank, so it does not depend on the world shape."""
    return (seed * 1_000_003 + virtual_rank * 10_007 + epoch) % 2**31


def sample_seed(stream: int, position: int | str) -> int:
    """The augmentation seed of the sample at `position` of a virtual rank's stream: independent of which worker
    process decodes it, so augmentation is a function of (seed, epoch, virtual rank, position) alone. With the
    prefetcher, micro-batch u's collate (FastCollateMixup) draws from sample_seed(stream, f"mix{u}") and its random
    erasing on the device from sample_seed(stream, f"erase{u}") (docs/seeds.md, rule 5)."""
    return int.from_bytes(hashlib.blake2b(f"{stream}:{position}".encode(), digest_size=4).digest(), "little")


def seed_all(seed: int) -> None:
    """Python's, NumPy's and torch's generators (timm's transforms draw from all three)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def virtual_sampler(dataset: Dataset, virtual: int, v: int, aug_repeats: int) -> RepeatAugSampler | DistributedSampler:
    """timm create_loader's training sampler for rank v of `virtual` replicas (seeds and shuffling as timm's)."""
    if aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=virtual, rank=v, num_repeats=aug_repeats)
    return DistributedSampler(dataset, num_replicas=virtual, rank=v)


class MicroBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's micro-batches, as lists of (dataset index, augmentation seed): update u, slot k holds positions
    [u*micro, (u+1)*micro) of virtual rank `rank * accum + k`. `start`: the updates of the epoch already done (a
    resume inside an epoch): the epoch's order is drawn whole, as before, and its first `start` updates skipped."""

    def __init__(
        self,
        dataset: Dataset,
        micro_batch: int,
        accum: int,
        world: int,
        rank: int,
        aug_repeats: int,
        seed: int = 0,
        start: int = 0,
    ):
        self.micro_batch, self.seed, self.epoch, self.start = micro_batch, seed, 0, start
        self.ranks = range(rank * accum, (rank + 1) * accum)
        self.samplers = [virtual_sampler(dataset, world * accum, v, aug_repeats) for v in self.ranks]
        self.updates = min(len(s) for s in self.samplers) // micro_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for s in self.samplers:
            s.set_epoch(epoch)

    def streams(self) -> list[int]:
        """This epoch's stream seed of each slot (docs/seeds.md, rule 2)."""
        return [stream_seed(self.seed, self.epoch, v) for v in self.ranks]

    def __iter__(self):
        orders = [list(s) for s in self.samplers]
        for u in range(self.start, self.updates):
            positions = range(u * self.micro_batch, (u + 1) * self.micro_batch)
            for order, s in zip(orders, self.streams()):
                yield [(order[p], sample_seed(s, p), sample_seed(s, f"mix{u}")) for p in positions]

    def erase_seeds(self) -> list[int]:
        """The seed of each micro-batch's random erasing on the device, in the order the loader yields them."""
        return [sample_seed(s, f"erase{u}") for u in range(self.start, self.updates) for s in self.streams()]

    def __len__(self) -> int:
        return (self.updates - self.start) * len(self.samplers)


class Seeded(Dataset):
    """Yields (image, label, collate seed) for (index, sample seed, collate seed), the generators seeded from the
    sample's own seed first (see `sample_seed`)."""

    def __init__(self, dataset: Split | Folder):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int, int]):
        index, seed, collate_seed = item
        seed_all(seed)
        return (*self.dataset[index], collate_seed)


class SeededCollate:
    """The collate function with the generators seeded from the micro-batch's collate seed (the one its samples
    carry): FastCollateMixup's draws, in whichever worker collates."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, samples: list[tuple]):
        seed_all(samples[0][2])
        return self.fn([s[:2] for s in samples])


class SeededCalls:
    """`fn` (PrefetchLoader's random erasing) with the generators seeded from seeds[i] at its i-th call, and the
    process's own streams (the training step's: drop path) left as they were."""

    def __init__(self, fn, seeds: list[int], device: torch.device):
        self.fn, self.seeds, self.device, self.calls = fn, seeds, device, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            seed_all(self.seeds[self.calls])
            self.calls += 1
            x = self.fn(x)
        random.setstate(state[0])
        np.random.set_state(state[1])
        return x


# A batch a worker cannot hand over (its feeder thread died: /dev/shm or memory exhausted, a socket it cannot bind) is
# never delivered, and a DataLoader without a timeout waits for it forever (a run holding its GPUs, or a CI job, until
# killed). A batch takes seconds; past this the stage fails in one line (rsb.errors) and resumes from its checkpoint.
STALL_S = 600


class WorkerSocketError(RsbError):
    """DataLoader workers could not hand batches to this process."""


def check_worker_sockets(workers: int) -> None:
    """Workers hand each batch's storage to the main process over a Unix socket under the temp folder (torch's
    file_descriptor sharing, through multiprocessing's resource sharer). A socket path past 107 bytes cannot be
    bound: the worker's feeder thread dies and the main process waits for the batch forever (seen with a long
    TMPDIR). The same kind of socket is bound here first, so that case is one line instead of a hang."""
    if workers == 0 or torch.multiprocessing.get_sharing_strategy() != "file_descriptor":
        return
    import tempfile
    from multiprocessing.connection import Listener

    try:
        Listener(family="AF_UNIX").close()
    except OSError as e:
        raise WorkerSocketError(
            f"TMPDIR = {tempfile.gettempdir()}: loader workers hand batches over a Unix socket under it, and "
            f"one cannot be made there ({e.strerror or e}); set TMPDIR to a shorter folder (e.g. /tmp), or "
            "train.workers: 0"
        ) from None


def train_loader(
    dataset: Split | Folder,
    r: Resolved,
    rank: int,
    epoch: int,
    device: torch.device,
    mean_std: dict | None = None,
    start: int = 0,
):
    """A fresh loader per epoch over this rank's micro-batches, from update `start` of the epoch; augmentation does
    not depend on the worker count. With the prefetcher (`mean_std`: the model's normalization), timm's
    PrefetchLoader on `device` around it, as create_loader(use_prefetcher=True) builds it, its erasing seeded per
    micro-batch."""
    sampler = MicroBatchSampler(
        dataset, r.micro_batch, r.grad_accum, r.world_size, rank, r.recipe.aug_repeats, seed=r.train.seed, start=start
    )
    sampler.set_epoch(epoch)
    loader = worker_loader(
        Seeded(dataset),
        r.workers,
        batch_sampler=sampler,
        collate_fn=SeededCollate(collate(r, dataset.num_classes)),
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    if not r.prefetcher:
        return loader
    assert mean_std is not None, "the prefetcher normalizes on the device: give the model's mean and std"
    prefetch = PrefetchLoader(
        loader,
        **mean_std,
        channels=3,
        device=device,
        img_dtype=torch.float32,
        re_prob=r.recipe.reprob,
        re_mode="pixel",
        re_count=1,
        re_num_splits=0,
    )
    if prefetch.random_erasing is not None:  # PrefetchLoader calls it on each batch: seeded per micro-batch
        erase = SeededCalls(prefetch.random_erasing, sampler.erase_seeds(), device)
        prefetch.random_erasing = erase  # type: ignore[assignment]  # a callable of the same signature
    return prefetch


def eval_loader(dataset: Dataset, batch_size: int, workers: int, pin_memory: bool = False) -> DataLoader:
    return worker_loader(dataset, workers, batch_size=batch_size, shuffle=False, pin_memory=pin_memory)


def worker_loader(dataset: Dataset, workers: int, **kwargs) -> DataLoader:
    """Every DataLoader of the project: its workers' sockets checked first, and a batch they never deliver an error
    after STALL_S instead of a wait without end."""
    check_worker_sockets(workers)
    return DataLoader(dataset, num_workers=workers, timeout=STALL_S if workers else 0, **kwargs)
