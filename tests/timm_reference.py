"""timm's train.py, assembled from timm's own helpers and run on real processes, and timm's validate.py (at the
end of this file): the independent side of every fidelity test.

Nothing here comes from rsb or stages (no import of either, anywhere in this file):
- the recipe values are the paper's table (tests/reference/rsb_recipes.csv, see its README), DeiT's main.py defaults
  for T2, and a pinned copy of the project's own fine-tune (FT) — never params.yaml, so a value changed there fails;
  a test that changes a recipe value for speed (a shorter warmup) hands the same `overrides` to both sides;
- each component is built as train.py's `main()` builds it, through timm's helpers (`optimizer_kwargs`,
  `scheduler_kwargs`, `create_transform` with create_loader's arguments, `Mixup(**mixup_args)`, the loss branch,
  timm's samplers);
- a run is train.py's loop on `world` real processes (gloo): torch's DistributedDataParallel averages the gradients
  (`--no-ddp-bb`: each process keeps its BatchNorm statistics during the epoch), timm's own `distribute_bn` reduces
  them after each epoch, train.py's `validate` follows, `--grad-accum-steps` as train.py accumulates;
- the seed contract (docs/seeds.md: which seed drives what, per sample, per process, per epoch) is implemented here
  from its specification, independently of rsb.loader.

It mirrors train.py at huggingface/pytorch-image-models commit 2aabaef (timm 1.x; this project pins timm==1.0.31) on
both data paths: `--no-prefetcher` (Mixup on the float batch) and, where the params say `train.prefetcher`, its
default prefetcher (`create_loader(use_prefetcher=True)` with `FastCollateMixup` as collate_fn; uint8 batches,
normalized and randomly erased by timm's PrefetchLoader). `scale` (how the mini run shrinks a recipe) is this
project's, not train.py's: the reference reads it, and train.seed / train.channels_last, from the test's params file
and computes the scaled epochs, warmup and image size itself; the lr goes through train.py's own `lr_base` rule.

Processes are forked from a fork server that has imported this module once per test session (~7 s on 2 cores), so
a run costs its training, not a fresh interpreter per process.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import inspect
import itertools
import multiprocessing
import random
import tempfile
from argparse import Namespace
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.data import FastCollateMixup, Mixup, create_loader, create_transform, resolve_data_config
from timm.data.distributed_sampler import OrderedDistributedSampler, RepeatAugSampler
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEma, NativeScaler, distribute_bn, random_seed, reduce_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torchvision.datasets import ImageFolder


def _posterize_as_pillow_before_13() -> None:
    """The Pillow that timm's RandAugment was written against answered `posterize(img, 0)` with a black image;
    Pillow 13 raises instead, which DeiT's rand-m9-mstd0.5 reaches in ~2% of its posterize draws. train.py on the
    Pillow of its time therefore saw black images there: give timm's op that answer (written here from Pillow's
    former behaviour, not taken from rsb)."""
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    original = auto_augment.posterize

    def posterize(img, bits_to_keep, **kwargs):
        return (
            img.point([0] * 256 * len(img.getbands())) if bits_to_keep <= 0 else original(img, bits_to_keep, **kwargs)
        )

    for name, op in list(auto_augment.NAME_TO_OP.items()):
        if op is original:
            auto_augment.NAME_TO_OP[name] = posterize
    auto_augment.posterize = posterize


_posterize_as_pillow_before_13()

# --- the recipes: the paper's table, DeiT's main.py, the project's fine-tune ----------------------------------------

PAPER_TABLE = Path(__file__).parent / "reference" / "rsb_recipes.csv"
# Keys the paper's table does not list: timm train.py's defaults of the paper's time (commit 004fb5f8, 2021), and
# --amp (the paper trains in mixed precision).
TRAIN_PY_2021 = {"warmup_lr": 1e-4, "min_lr": 1e-6, "hflip": 0.5, "train_interpolation": "random", "amp": True}
# facebookresearch/deit main.py, get_args_parser() defaults (read 2026-11-29), in timm train.py option names, at the
# paper's batch 2048 (lr: main.py's linear rule 5e-4 x batch / 512).
DEIT_MAIN_PY = {
    "epochs": 300,
    "img_size": 224,
    "test_img_size": 224,
    "crop_pct": 0.875,
    "batch_size": 2048,
    "opt": "adamw",
    "lr": 5e-4 * 2048 / 512,
    "weight_decay": 0.05,
    "sched": "cosine",
    "warmup_epochs": 5,
    "warmup_lr": 1e-6,
    "min_lr": 1e-5,
    "bce_loss": False,
    "bce_target_thresh": None,
    "smoothing": 0.1,
    "drop_path": 0.1,
    "aug_repeats": 3,
    "aa": "rand-m9-mstd0.5-inc1",
    "mixup": 0.8,
    "cutmix": 1.0,
    "reprob": 0.25,
    "hflip": 0.5,
    "model_ema": True,  # main.py: --model-ema is on by default (timm.utils.ModelEma, updated after each step)
    "amp": True,
    "train_interpolation": "bicubic",
    "model_ema_decay": 0.99996,
    "model_ema_force_cpu": False,
}
# The transfer study's fine-tune is this project's own procedure (no published values could be read); pinned here so
# that an unintended change of params.yaml's `recipes.ft` fails a test.
FT = {
    "epochs": 100,
    "img_size": 224,
    "test_img_size": 224,
    "crop_pct": 0.875,
    "batch_size": 512,
    "opt": "sgd",
    "lr": 0.01,
    "weight_decay": 1e-4,
    "sched": "cosine",
    "warmup_epochs": 2,
    "warmup_lr": 1e-5,
    "min_lr": 0.0,
    "bce_loss": False,
    "bce_target_thresh": None,
    "smoothing": 0.1,
    "drop_path": 0.0,
    "aug_repeats": 0,
    "aa": None,
    "mixup": 0.0,
    "cutmix": 0.0,
    "reprob": 0.0,
    "hflip": 0.5,
    "model_ema": False,
    "amp": True,
    "train_interpolation": "bilinear",
}


def _value(text: str):
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def paper_recipes() -> dict[str, dict]:
    with open(PAPER_TABLE) as f:
        rows = list(csv.DictReader(f))
    names = [k for k in rows[0] if k != "key"]
    return {n: {**TRAIN_PY_2021, **{row["key"]: _value(row[n]) for row in rows}} for n in names}


RECIPES = {**paper_recipes(), "t2": DEIT_MAIN_PY, "ft": FT}


def recipe(name: str, overrides: dict | None = None) -> dict:
    """A recipe by name, with the test's `recipes.<name>.<key>` overrides (the same ones its params file has)."""
    prefix = f"recipes.{name}."
    return {**RECIPES[name], **{k[len(prefix) :]: v for k, v in (overrides or {}).items() if k.startswith(prefix)}}


# --- train.py's args --------------------------------------------------------------------------------------------------

# train.py's argparse defaults, for the options its components read (train.py: "Model parameters" ... "Misc").
TRAIN_PY_DEFAULTS = dict(
    model="resnet50",
    pretrained=False,
    pretrained_path=None,
    initial_checkpoint="",
    num_classes=None,
    gp=None,
    img_size=None,
    in_chans=None,
    input_size=None,
    crop_pct=None,
    mean=None,
    std=None,
    interpolation="",
    batch_size=128,
    grad_accum_steps=1,
    model_kwargs={},
    torchscript=False,
    opt="sgd",
    opt_eps=None,
    opt_betas=None,
    momentum=0.9,
    weight_decay=2e-5,
    clip_grad=None,
    clip_mode="norm",
    layer_decay=None,
    opt_kwargs={},
    sched="cosine",
    sched_on_updates=False,
    lr=None,
    lr_base=0.1,
    lr_base_size=256,
    lr_base_scale="",
    lr_noise=None,
    lr_noise_pct=0.67,
    lr_noise_std=1.0,
    lr_cycle_mul=1.0,
    lr_cycle_decay=0.5,
    lr_cycle_limit=1,
    lr_k_decay=1.0,
    warmup_lr=1e-5,
    min_lr=0.0,
    epochs=300,
    decay_milestones=[90, 180, 270],
    decay_epochs=90,
    warmup_epochs=5,
    warmup_prefix=False,
    cooldown_epochs=0,
    patience_epochs=10,
    decay_rate=0.1,
    no_aug=False,
    scale=[0.08, 1.0],
    ratio=[3.0 / 4.0, 4.0 / 3.0],
    hflip=0.5,
    vflip=0.0,
    color_jitter=0.4,
    aa=None,
    aug_repeats=0,
    aug_splits=0,
    jsd_loss=False,
    bce_loss=False,
    bce_target_thresh=None,
    reprob=0.0,
    remode="pixel",
    recount=1,
    resplit=False,
    mixup=0.0,
    cutmix=0.0,
    cutmix_minmax=None,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode="batch",
    mixup_off_epoch=0,
    smoothing=0.1,
    train_interpolation="random",
    drop=0.0,
    drop_path=None,
    drop_block=None,
    bn_momentum=None,
    bn_eps=None,
    dist_bn="reduce",
    model_ema=False,
    model_ema_decay=0.9998,  # train.py's default (DeiT's main.py: 0.99996)
    model_ema_force_cpu=False,
    seed=42,
    amp=False,
    amp_dtype="float16",
    channels_last=False,
    eval_metric="top1",
)
NOT_TRAIN_PY = {"test_img_size"}  # recipe keys that are validate.py's (the eval size), not train.py's


def args_for(
    params: dict,
    recipe_name: str,
    arch: str,
    num_classes: int,
    micro_batch: int,
    world: int,
    accum: int,
    precision: str = "fp32",
    pretrained_path: str | None = None,
    overrides: dict | None = None,
) -> Namespace:
    """train.py's `args` for one recipe on `world` processes with `--grad-accum-steps accum`; with `pretrained_path`,
    the transfer study's fine-tune: `--pretrained --pretrained-path`, and transfer.epochs / transfer.lr_factor in
    place of scale's (where not null). `params` (the test's params file, plain YAML) gives only the scale, the seed
    and the memory layout."""
    rec, scale = recipe(recipe_name, overrides), dict(params["scale"])
    if pretrained_path:
        for key in ("epochs", "lr_factor"):
            if params["transfer"][key] is not None:
                scale[key] = params["transfer"][key]
    unknown = set(rec) - set(TRAIN_PY_DEFAULTS) - NOT_TRAIN_PY
    assert not unknown, f"recipe keys that are not train.py options: {unknown}"
    args = Namespace(**{**copy.deepcopy(TRAIN_PY_DEFAULTS), **{k: v for k, v in rec.items() if k not in NOT_TRAIN_PY}})
    args.test_img_size = max(8, round(rec["test_img_size"] * scale["img_size"] / 224))  # validate.py --img-size
    # the scaled run, computed here independently of rsb.config
    args.epochs = max(scale["min_epochs"], round(rec["epochs"] * scale["epochs"]))
    args.warmup_epochs = rec["warmup_epochs"] * args.epochs / rec["epochs"]
    args.img_size = max(8, round(rec["img_size"] * scale["img_size"] / 224))
    args.model, args.num_classes, args.seed = arch, num_classes, params["train"]["seed"]
    args.pretrained, args.pretrained_path = bool(pretrained_path), pretrained_path
    # a model that fixes its patch grid at creation is built for the scaled size, as `--model-kwargs img_size=N`
    # would build it (decided here from the model class's own signature)
    cls = type(timm.create_model(arch, pretrained=False))
    if args.img_size != 224 and "img_size" in inspect.signature(cls.__init__).parameters:
        args.model_kwargs = {"img_size": args.img_size}
    args.channels_last = params["train"]["channels_last"]  # train.py --channels-last (memory layout only)
    args.prefetcher = params["train"].get("prefetcher", "auto")  # train.py's default prefetcher, or --no-prefetcher
    args.batch_size, args.grad_accum_steps, args.world_size = micro_batch, accum, world
    # DeiT's EMA decay is per update of its own run (the recipe's epochs at ImageNet's 1,281,167 images and the
    # recipe's batch); a shorter run keeps its horizon the same fraction: decay ** (those updates / this run's)
    args.ema_paper_updates = rec["epochs"] * (1_281_167 // rec["batch_size"])
    assert micro_batch * accum * world == scale["batch_size"], "the reference runs the params' global batch"
    args.sched_on_updates = True  # the schedule is stepped per update (timm's --sched-on-updates)
    args.amp = rec["amp"] and precision != "fp32"
    args.amp_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float16")
    # train.py: `if not args.lr:` the lr comes from lr_base and the global batch; the recipe's lr is the paper's at
    # its own batch size, so lr_base = recipe lr, lr_base_size = recipe batch
    if scale["lr_rule"] == "none":
        args.lr = rec["lr"]
    else:
        args.lr, args.lr_base, args.lr_base_size, args.lr_base_scale = (
            None,
            rec["lr"],
            rec["batch_size"],
            scale["lr_rule"],
        )
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if args.lr_base_scale == "sqrt":
            batch_ratio = batch_ratio**0.5
        args.lr = args.lr_base * batch_ratio
    args.lr *= scale.get("lr_factor", 1.0)  # the mini run's own factor (1 = the paper)
    return args


# --- the components, as train.py builds them -------------------------------------------------------------------


def model_of_rank(args: Namespace, rank: int = 0) -> torch.nn.Module:
    """train.py: `utils.random_seed(args.seed, args.rank)`, then create_model (DDP then broadcasts rank 0's)."""
    random_seed(args.seed, rank)
    return create_model(args)


def create_model(args: Namespace) -> torch.nn.Module:
    factory_kwargs = {}
    if args.pretrained_path:  # train.py: "merge with pretrained_cfg of model, 'file' has priority over 'url'"
        factory_kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)  # head adaptation
    return timm.create_model(
        args.model,
        pretrained=args.pretrained,
        in_chans=3,
        num_classes=args.num_classes,
        drop_rate=args.drop,
        drop_path_rate=args.drop_path,
        drop_block_rate=args.drop_block,
        global_pool=args.gp,
        bn_momentum=args.bn_momentum,
        bn_eps=args.bn_eps,
        scriptable=args.torchscript,
        checkpoint_path=args.initial_checkpoint,
        **factory_kwargs,
        **args.model_kwargs,
    )


def create_optimizer(model: torch.nn.Module, args: Namespace) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, args: Namespace, updates_per_epoch: int):
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    return scheduler


def mixup_active(args: Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None


def mixup_args(args: Namespace) -> dict:
    return dict(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        cutmix_minmax=args.cutmix_minmax,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=args.num_classes,
    )


def create_mixup(args: Namespace, prefetcher: bool = False) -> Mixup | None:
    """train.py without the prefetcher: `mixup_fn = Mixup(**mixup_args)` (with it, the collate_fn mixes)."""
    if not mixup_active(args) or prefetcher:
        return None
    return Mixup(**mixup_args(args))


def uses_prefetcher(args: Namespace, device: torch.device) -> bool:
    """The params' train.prefetcher: true, false, or auto (train.py's default, the prefetcher, where CUDA is)."""
    return args.prefetcher is True or (args.prefetcher == "auto" and device.type == "cuda")


def create_prefetch_loader(args: Namespace, dataset, model: torch.nn.Module, device: torch.device):
    """train.py with its prefetcher: `collate_fn = FastCollateMixup(**mixup_args)` when Mixup is active, then
    create_loader(..., use_prefetcher=True) with train.py's arguments: the dataset's transform becomes timm's
    uint8 one, the loader a PrefetchLoader on `device` that normalizes and erases there. (create_loader's sampler is
    replaced per epoch by `prefetch_epoch`; without a process group it takes no repeats, which only its own sampler
    would use.)"""
    data_config = resolve_data_config(vars(args), model=model)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    distributed = dist.is_available() and dist.is_initialized()
    return create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        is_training=True,
        no_aug=args.no_aug,
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_split=args.resplit,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        num_aug_repeats=args.aug_repeats if distributed else 0,
        num_aug_splits=0,
        interpolation=train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=1,
        distributed=distributed,
        collate_fn=FastCollateMixup(**mixup_args(args)) if mixup_active(args) else None,
        pin_memory=False,
        img_dtype=torch.float32,
        device=device,
        use_prefetcher=True,
    )


def create_loss(args: Namespace) -> torch.nn.Module:
    """train.py's branch (no JSD): with Mixup active, smoothing is handled by the Mixup target transform."""
    if mixup_active(args):
        return (
            BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss else SoftTargetCrossEntropy()
        )
    if args.smoothing:
        return (
            BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh)
            if args.bce_loss
            else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
        )
    return torch.nn.CrossEntropyLoss()


def train_transform(args: Namespace, model: torch.nn.Module):
    """create_loader(is_training=True, ...) with train.py's arguments, as create_loader hands them on."""
    data_config = resolve_data_config(vars(args), model=model)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    return create_transform(
        data_config["input_size"],
        is_training=True,
        no_aug=args.no_aug,
        scale=args.scale,
        ratio=args.ratio,
        hflip=args.hflip,
        vflip=args.vflip,
        color_jitter=args.color_jitter,
        auto_augment=args.aa,
        interpolation=train_interpolation,
        mean=data_config["mean"],
        std=data_config["std"],
        re_prob=args.reprob,
        re_mode=args.remode,
        re_count=args.recount,
        re_num_splits=0,
        use_prefetcher=False,
        separate=False,
    )


def eval_transform(args: Namespace, model: torch.nn.Module):
    """validate.py at the paper's eval: `--img-size <test size> --crop-pct <recipe's> --interpolation bicubic`."""
    cfg = resolve_data_config(
        {"img_size": args.test_img_size, "crop_pct": args.crop_pct, "interpolation": "bicubic"}, model=model
    )
    return create_transform(
        cfg["input_size"],
        is_training=False,
        interpolation=cfg["interpolation"],
        crop_pct=cfg["crop_pct"],
        mean=cfg["mean"],
        std=cfg["std"],
    )


def create_sampler(dataset, args: Namespace, num_replicas: int, rank: int):
    """create_loader(distributed=True, is_training=True): RepeatAugSampler with repeats, else DistributedSampler.
    (train.py on one process refuses repeats and shuffles with a RandomSampler: not a shape this project runs.)"""
    if args.aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=args.aug_repeats)
    return torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank)


def with_init_scale(init_scale: float) -> None:
    """Every torch GradScaler created from now on in this process starts at `init_scale` (timm's NativeScaler and
    DeepSpeed's torch_autocast both create theirs with torch's defaults): a test's forced fp16 overflow."""
    original = torch.amp.GradScaler.__init__

    def init(self, *a, **k):
        k.setdefault("init_scale", init_scale)
        original(self, *a, **k)

    torch.amp.GradScaler.__init__ = init


def amp_autocast(args: Namespace, device: torch.device):
    if not args.amp:
        return suppress
    return partial(
        torch.autocast, device_type=device.type, dtype=torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    )


# --- the seed contract (docs/seeds.md), implemented from its specification -------------------------------------------


def stream_seed(seed: int, epoch: int, process: int) -> int:
    """docs/seeds.md, rule 2: (seed x 1,000,003 + process x 10,007 + epoch) mod 2^31."""
    return (seed * 1_000_003 + process * 10_007 + epoch) % 2**31


def sample_seed(stream: int, position: int) -> int:
    """docs/seeds.md, rule 3: the first 4 bytes of BLAKE2b("<stream>:<position>"), little-endian."""
    return int.from_bytes(hashlib.blake2b(f"{stream}:{position}".encode(), digest_size=4).digest(), "little")


def seed_all(seed: int) -> None:
    """docs/seeds.md, rule 4: Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class SeededPositions(torch.utils.data.Dataset):
    """Yields dataset[index] for (index, position), the generators seeded from the sample's own seed first; with
    `carry`, the position rides along (for the collate's seed)."""

    def __init__(self, dataset, stream: int, carry: bool = False):
        self.dataset, self.stream, self.carry = dataset, stream, carry

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, position = item
        seed_all(sample_seed(self.stream, position))
        return (*self.dataset[index], position) if self.carry else self.dataset[index]


class MixSeededCollate:
    """docs/seeds.md, rule 5: micro-batch u (positions [u·m, (u+1)·m)) collated with the generators seeded with
    sample(stream, "mix<u>")."""

    def __init__(self, fn, stream: int, micro_batch: int):
        self.fn, self.stream, self.micro_batch = fn, stream, micro_batch

    def __call__(self, samples):
        seed_all(sample_seed(self.stream, f"mix{samples[0][2] // self.micro_batch}"))
        return self.fn([s[:2] for s in samples])


class EraseSeeded:
    """docs/seeds.md, rule 5: the u-th erasing of the epoch with the generators seeded with sample(stream,
    "erase<u>"), this process's generators restored afterwards."""

    def __init__(self, erase, stream: int):
        self.erase, self.stream, self.u = erase, stream, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        seed_all(sample_seed(self.stream, f"erase{self.u}"))
        self.u += 1
        x = self.erase(x)
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, x.device)
        return x


def prefetch_epoch(prefetcher, original, sampler, micro_batch: int, stream: int):
    """One epoch of the prefetcher's loader under the seed contract: create_loader's DataLoader (`original`: its
    dataset with timm's uint8 transform, its collate_fn) over the contract's micro-batches of timm's sampler, one
    worker, and its erasing seeded per micro-batch."""
    prefetcher.loader = torch.utils.data.DataLoader(
        SeededPositions(original.dataset, stream, carry=True),
        batch_sampler=micro_batches(sampler, micro_batch),
        collate_fn=MixSeededCollate(original.collate_fn, stream, micro_batch),
        num_workers=1,
        multiprocessing_context="fork",
    )
    if prefetcher.random_erasing is not None:
        erase = getattr(prefetcher.random_erasing, "erase", prefetcher.random_erasing)
        prefetcher.random_erasing = EraseSeeded(erase, stream)
    return prefetcher


def micro_batches(sampler, micro_batch: int) -> list[list[tuple[int, int]]]:
    """create_loader's training batches (drop_last) over the sampler's epoch order, each sample with its position."""
    order = list(enumerate(sampler))
    return [
        [(i, p) for p, i in order[b * micro_batch : (b + 1) * micro_batch]] for b in range(len(order) // micro_batch)
    ]


# --- a run: train.py's main() on `world` processes -------------------------------------------------------------------


@dataclass
class Result:
    args: Namespace
    log: list[dict]  # per update: loss (mean over the global batch), lr used, gradients handed to step()
    # (None where fp16's scaler skipped the step)
    state: dict  # rank 0's final state_dict (BatchNorm statistics after distribute_bn)
    ema: dict | None = None  # rank 0's model EMA (DeiT's --model-ema), when the recipe keeps one
    val: list[float] = field(default_factory=list)  # top-1 (%) after each epoch, when a val folder was given
    info: dict = field(default_factory=dict)  # loss and optimizer classes, updates per epoch
    steps: int = 0  # optimizer steps that ran (fp16: updates minus skipped ones)


def run(
    args: Namespace,
    train_dir: Path,
    world: int,
    epochs: int | None = None,
    val_dir: Path | None = None,
    plant: dict | None = None,
    timeout: float = 600,
    device: str = "cpu",
) -> Result:
    """train.py on `world` processes for `epochs` (default: all of them), on the CPU (gloo) or on `device` "cuda":
    process r on GPU r (torch.device("cuda", r)), NCCL between them, as torchrun runs train.py. `plant` is for tests
    that show a bug would be seen: {"loss_scale": f} multiplies the loss; {"init_scale": s} starts fp16's loss scaler
    at s (both sides of a test get it: a forced overflow)."""
    assert device in ("cpu", "cuda"), device
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    with tempfile.TemporaryDirectory(prefix="timm-ref-") as tmp:
        cfg = dict(
            args=args,
            train_dir=str(train_dir),
            val_dir=str(val_dir) if val_dir else None,
            epochs=epochs or args.epochs,
            store=f"{tmp}/store",
            out=f"{tmp}/result.pt",
            plant=plant or {},
            device=device,
        )
        procs = [ctx.Process(target=_process, args=(rank, world, cfg)) for rank in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        codes = [p.exitcode for p in procs]
        assert codes == [0] * world, f"reference processes exited with {codes} (their tracebacks are above)"
        return Result(args=args, **torch.load(cfg["out"], weights_only=False))


def _process(rank: int, world: int, cfg: dict) -> None:
    torch.set_num_threads(1)
    args = copy.deepcopy(cfg["args"])
    # train.py's device: its local rank's GPU (an index is required by set_device), or the CPU
    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    args.rank, args.distributed = rank, world > 1
    if device.type == "cuda":  # train.py's main() on a GPU
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if "init_scale" in cfg["plant"]:
        with_init_scale(cfg["plant"]["init_scale"])
    steps: list = []  # the gradients handed to each optimizer step that ran (a loss scaler skips overflows)
    register_optimizer_step_pre_hook(
        lambda opt, a, k: steps.append(
            [p.grad.detach().float().cpu().clone() for g in opt.param_groups for p in g["params"]]
        )
    )
    if args.distributed:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{cfg['store']}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=300),
        )
    model = model_of_rank(args, rank).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    # DeiT main.py: the EMA is made after model.to(device), before the DDP wrapper (timm.utils.ModelEma)
    model_ema = (
        ModelEma(model, decay=args.model_ema_decay, device="cpu" if args.model_ema_force_cpu else "")
        if args.model_ema
        else None
    )
    optimizer = create_optimizer(model, args)
    prefetcher = uses_prefetcher(args, device)
    train_set = ImageFolder(cfg["train_dir"], transform=None if prefetcher else train_transform(args, model))
    loader_train = create_prefetch_loader(args, train_set, model, device) if prefetcher else None
    original = loader_train.loader if prefetcher else None
    val_set = ImageFolder(cfg["val_dir"], transform=eval_transform(args, model)) if cfg["val_dir"] else None
    if args.distributed:
        ids = [device.index] if device.type == "cuda" else None  # train.py: DDP(model, device_ids=[device])
        model = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)  # train.py --no-ddp-bb
    sampler = create_sampler(train_set, args, world, rank)
    batches = len(sampler) // args.batch_size
    updates_per_epoch = (batches + args.grad_accum_steps - 1) // args.grad_accum_steps
    scheduler = create_scheduler(optimizer, args, updates_per_epoch)
    if model_ema is not None:
        model_ema.decay = args.model_ema_decay ** (args.ema_paper_updates / (args.epochs * updates_per_epoch))
    loss_fn, mixup_fn = create_loss(args), create_mixup(args, prefetcher)
    if "loss_scale" in cfg["plant"]:
        inner, factor = loss_fn, cfg["plant"]["loss_scale"]
        loss_fn = lambda out, y: inner(out, y) * factor  # noqa: E731
    # train.py: `loss_scaler = NativeScaler()` for float16 autocast on CUDA only (bfloat16 needs none)
    scaler = (
        NativeScaler(device=device.type) if args.amp and args.amp_dtype == "float16" and device.type == "cuda" else None
    )
    ctx = Epoch(
        model, optimizer, scheduler, loss_fn, mixup_fn, amp_autocast(args, device), args, world, device, scaler, steps
    )
    ctx.model_ema = model_ema
    log, val = [], []
    for epoch in range(cfg["epochs"]):
        sampler.set_epoch(epoch)  # train.py: loader_train.sampler.set_epoch(epoch)
        stream = stream_seed(args.seed, epoch, rank)
        if prefetcher:
            loader = prefetch_epoch(loader_train, original, sampler, args.batch_size, stream)
        else:
            loader = torch.utils.data.DataLoader(
                SeededPositions(train_set, stream),
                batch_sampler=micro_batches(sampler, args.batch_size),
                num_workers=1,
                multiprocessing_context="fork",
            )  # a worker, as train.py decodes
        log += ctx.train_one_epoch(epoch, loader, stream)
        if args.distributed:
            distribute_bn(model, world, reduce=True)  # train.py --dist-bn reduce
        if val_set is not None:
            val.append(validate(model, val_set, args, ctx.autocast, world, rank))
    if rank == 0:
        unwrapped = model.module if args.distributed else model
        torch.save(
            {
                "log": log,
                "state": {k: v.cpu().clone() for k, v in unwrapped.state_dict().items()},
                "ema": None
                if model_ema is None
                else {k: v.cpu().clone() for k, v in model_ema.ema.state_dict().items()},
                "val": val,
                "steps": len(steps),
                "info": {
                    "loss": type(ctx.loss_fn).__name__ if not cfg["plant"] else "planted",
                    "optimizer": type(optimizer).__name__,
                    "updates_per_epoch": updates_per_epoch,
                },
            },
            cfg["out"],
        )
    if args.distributed:
        dist.destroy_process_group()


@dataclass
class Epoch:
    """train.py's train_one_epoch, recording what each update hands the optimizer. With the prefetcher the batch
    arrives on the device, normalized, erased and mixed (`mixup_fn` is None), as train.py then skips both steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    loss_fn: object
    mixup_fn: Mixup | None
    autocast: object
    args: Namespace
    world: int
    device: torch.device
    scaler: NativeScaler | None = None
    steps: list = field(default_factory=list)  # filled by the optimizer's pre-hook (`_process`)
    model_ema: ModelEma | None = None  # DeiT's engine.py: model_ema.update(model) after each optimizer step

    def train_one_epoch(self, epoch: int, loader, stream: int) -> list[dict]:
        model, optimizer, args = self.model, self.optimizer, self.args
        model.train()
        accum_steps = args.grad_accum_steps
        last_accum_steps = len(loader) % accum_steps
        updates_per_epoch = (len(loader) + accum_steps - 1) // accum_steps
        num_updates = epoch * updates_per_epoch
        last_batch_idx, last_batch_idx_to_accum = len(loader) - 1, len(loader) - last_accum_steps
        batches = iter(loader)  # (the workers' base seed is drawn here, before this process's stream is seeded)
        if not isinstance(loader, torch.utils.data.DataLoader):  # a PrefetchLoader starts its DataLoader (and the
            batches = itertools.chain([next(batches)], batches)  # draw) at the first batch: take it before seeding
        seed_all(stream)  # docs/seeds.md rule 2: this process's Mixup/CutMix and drop-path draws for the epoch
        optimizer.zero_grad()
        log, losses = [], []
        for batch_idx, (input, target) in enumerate(batches):
            need_update = batch_idx == last_batch_idx or (batch_idx + 1) % accum_steps == 0
            if batch_idx >= last_batch_idx_to_accum:
                accum_steps = last_accum_steps
            input, target = input.to(self.device), target.to(self.device)
            if self.mixup_fn is not None:
                input, target = self.mixup_fn(input, target)
            if args.channels_last:
                input = input.contiguous(memory_format=torch.channels_last)
            sync = nullcontext() if need_update or self.world == 1 else model.no_sync()
            with sync:
                with self.autocast():
                    loss = self.loss_fn(model(input), target)
                if accum_steps > 1:
                    loss /= accum_steps
                if self.scaler is not None:  # train.py's _backward: the scaler steps (or skips) the optimizer
                    ran = len(self.steps)
                    self.scaler(loss, optimizer, need_update=need_update)
                else:
                    loss.backward()
            losses.append(loss.detach().float() * accum_steps)
            if not need_update:
                continue
            lr = optimizer.param_groups[0]["lr"]
            if self.scaler is None:
                optimizer.step()
                grads = self.steps[-1]
            else:
                grads = self.steps[-1] if len(self.steps) > ran else None  # None: the scaler skipped an overflow
            num_updates += 1
            optimizer.zero_grad()
            if self.model_ema is not None:
                self.model_ema.update(model)  # the DDP-wrapped model: ModelEma adds the `module.` prefix
            mean = torch.stack(losses).mean()
            losses = []
            log.append(
                {"loss": (reduce_tensor(mean, self.world) if self.world > 1 else mean).item(), "lr": lr, "grads": grads}
            )
            self.scheduler.step_update(num_updates=num_updates)
        return log


@torch.no_grad()
def validate(model, dataset, args: Namespace, autocast, world: int, rank: int) -> float:
    """train.py's validate over create_loader's OrderedDistributedSampler shards; correct counts summed over
    processes (train.py averages per-batch top-1 across processes: the same number on shards of equal size)."""
    model.eval()
    shard = OrderedDistributedSampler(dataset, num_replicas=world, rank=rank) if world > 1 else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, sampler=shard, num_workers=0)
    counts = torch.zeros(2, dtype=torch.float64)
    for input, target in loader:
        input = input.to(next(model.parameters()).device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = model(input)
        counts += torch.tensor([(output.argmax(1).cpu() == target).sum().item(), len(target)], dtype=torch.float64)
    if world > 1:  # on the model's device: NCCL reduces CUDA tensors only
        on_device = counts.to(next(model.parameters()).device)
        dist.all_reduce(on_device)
        counts = on_device.cpu()
    return float(100 * counts[0] / counts[1])


# --- validate.py: the independent side of the evaluation's fidelity tests ---------------------------------------------

# validate.py's argparse defaults, for the options `validate(args)` reads (pytorch-image-models validate.py, timm 1.x).
VALIDATE_PY_DEFAULTS = dict(
    data_dir=None,
    dataset="",
    split="validation",
    num_samples=None,
    class_map="",
    input_img_mode=None,
    input_key=None,
    target_key=None,
    model="resnet50",
    pretrained=False,
    workers=4,
    batch_size=256,
    img_size=None,
    in_chans=None,
    input_size=None,
    use_train_size=False,
    crop_pct=None,
    crop_mode=None,
    crop_border_pixels=None,
    mean=None,
    std=None,
    interpolation="",
    num_classes=None,
    gp=None,
    checkpoint="",
    test_pool=False,
    no_prefetcher=False,
    pin_mem=False,
    channels_last=False,
    device="cuda",
    amp=False,
    amp_dtype="float16",
    model_dtype=None,
    use_ema=False,
    model_kwargs={},
    real_labels="",
    valid_labels="",
    seed=42,
    torchscript=False,
)


def validate_py_args(
    train_args: Namespace,
    data_dir: Path,
    checkpoint: Path,
    batch_size: int,
    real_labels: Path | None = None,
    prefetcher: bool = False,
    device: str = "cpu",
) -> Namespace:
    """validate.py's command line for the weights of the run `train_args` describes, at the paper's eval:
    `--data-dir D --model M --num-classes K --checkpoint W --img-size <test size> --crop-pct <recipe's>
    --interpolation bicubic -b B -j 0 [--channels-last] [--amp --amp-dtype bfloat16] [--real-labels real.json]
    [--no-prefetcher] [--model-kwargs img_size=<train size>] --device D`. The mean and std are the model's own
    (validate.py resolves them from its pretrained config)."""
    return Namespace(
        **{
            **copy.deepcopy(VALIDATE_PY_DEFAULTS),
            **dict(
                data_dir=str(data_dir),
                model=train_args.model,
                num_classes=train_args.num_classes,
                checkpoint=str(checkpoint),
                img_size=train_args.test_img_size,
                crop_pct=train_args.crop_pct,
                interpolation="bicubic",
                batch_size=batch_size,
                workers=0,
                channels_last=train_args.channels_last,
                amp=train_args.amp,
                amp_dtype=train_args.amp_dtype,
                real_labels=str(real_labels) if real_labels else "",
                no_prefetcher=not prefetcher,
                model_kwargs=dict(train_args.model_kwargs),
                device=device,
            ),
        }
    )


@torch.inference_mode()
def validate_py(args: Namespace) -> dict:
    """validate.py's `validate(args)`, step by step, on timm's own pieces: its model (create_model through
    resolve_model_input_args, load_checkpoint), its data config (resolve_input_data_config with the test size), its
    dataset (create_dataset: timm's folder reader, classes in natural-key order: V2's folder `k` is class k), its
    loader (create_loader, with or without the prefetcher), `accuracy` averaged per batch by AverageMeter, and
    RealLabelsImagenet reading real.json itself. What validate.py prints, two runs in one pass: `top1`/`top5`
    without --real-labels, `real_top1`/`real_top5` with it (ReaL replaces the top-k values at the end), each rounded
    to 4 places as validate.py's results; plus the counts behind them (images, ReaL-scored images, and the correct
    ones) for an exact comparison. (validate.py's warm-up forward pass on random data changes no number: skipped.)"""
    from timm.data import RealLabelsImagenet, create_dataset, resolve_input_data_config
    from timm.models import load_checkpoint, resolve_model_input_args
    from timm.utils import AverageMeter, accuracy

    if torch.cuda.is_available():  # validate.py, first thing
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    device = torch.device(args.device)
    amp_autocast = (
        partial(
            torch.autocast,
            device_type=device.type,
            dtype=torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16,
        )
        if args.amp
        else suppress
    )
    random_seed(args.seed)
    model = timm.create_model(
        **resolve_model_input_args(
            args.model,
            vars(args),
            pretrained=args.pretrained,
            num_classes=args.num_classes,
            global_pool=args.gp,
            scriptable=args.torchscript,
            **args.model_kwargs,
        )
    )
    load_checkpoint(model, args.checkpoint, args.use_ema)
    data_config = resolve_input_data_config(model, vars(args), use_test_size=not args.use_train_size)
    model = model.to(device=device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dataset = create_dataset(
        root=args.data_dir,
        name=args.dataset,
        split=args.split,
        class_map=args.class_map,
        num_samples=args.num_samples,
        input_key=args.input_key,
        target_key=args.target_key,
        input_img_mode="RGB",
        seed=args.seed,
    )
    real_labels = (
        RealLabelsImagenet(dataset.filenames(basename=True), real_json=args.real_labels) if args.real_labels else None
    )
    loader = create_loader(
        dataset,
        input_size=data_config["input_size"],
        batch_size=args.batch_size,
        use_prefetcher=not args.no_prefetcher,
        interpolation=data_config["interpolation"],
        mean=data_config["mean"],
        std=data_config["std"],
        num_workers=args.workers,
        crop_pct=data_config["crop_pct"],
        crop_mode=data_config["crop_mode"],
        crop_border_pixels=args.crop_border_pixels,
        pin_memory=args.pin_mem,
        device=device,
        img_dtype=torch.float32,
    )
    top1, top5 = AverageMeter(), AverageMeter()
    correct = torch.zeros(2, dtype=torch.int64)
    model.eval()
    for input, target in loader:
        if args.no_prefetcher:
            target = target.to(device=device)
            input = input.to(device=device)
        if args.channels_last:
            input = input.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            output = model(input)
        if real_labels is not None:
            real_labels.add_result(output)
        acc1, acc5 = accuracy(output.detach(), target, topk=(1, 5))
        top1.update(acc1.item(), output.shape[0])
        top5.update(acc5.item(), output.shape[0])
        correct += torch.tensor([round(a.item() * output.shape[0] / 100) for a in (acc1, acc5)])
    out = {
        "top1": round(top1.avg, 4),
        "top5": round(top5.avg, 4),
        "count": len(dataset),
        "top1_correct": int(correct[0]),
        "top5_correct": int(correct[1]),
        "img_size": data_config["input_size"][-1],
        "crop_pct": data_config["crop_pct"],
        "interpolation": data_config["interpolation"],
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
    }
    if real_labels is not None:
        out.update(
            real_top1=round(real_labels.get_accuracy(k=1), 4),
            real_top5=round(real_labels.get_accuracy(k=5), 4),
            real_count=len(real_labels.is_correct[1]),
            real_top1_correct=int(sum(real_labels.is_correct[1])),
            real_top5_correct=int(sum(real_labels.is_correct[5])),
        )
    return out
