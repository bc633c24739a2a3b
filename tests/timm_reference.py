"""timm's train.py, assembled from timm's own helpers: the independent side of every fidelity test.

Nothing here builds a component through rsb. A recipe is read from params.yaml as plain YAML and laid over train.py's
argparse defaults (the recipe keys are train.py option names); each component is then built as train.py's `main()`
builds it, through the same timm helpers (`optimizer_kwargs`, `scheduler_kwargs`, `create_transform` with
create_loader's arguments, `Mixup(**mixup_args)`, the BCE branch, timm's samplers, `distribute_bn`). It mirrors
train.py at huggingface/pytorch-image-models commit 2aabaef (timm 1.x; this project pins timm==1.0.31), on its
`--no-prefetcher` path: Mixup runs on the float batch, not in FastCollateMixup on uint8 images.

`scale` (how the mini run shrinks a recipe) is this project's, not train.py's; the reference computes the scaled
epochs, warmup and image size itself from params.yaml and passes them to train.py's options, and the learning rate
goes through train.py's own `lr_base` rule.

Two choices are the project's own and are taken from rsb on purpose, so both sides draw the same random numbers:
the seed of each virtual rank's stream (`stream_seed`) and of each sample's augmentation (`sample_seed`).
Randomness is not part of timm's recipe; tests/test_train.py checks separately that the streams are distinct.
"""
from __future__ import annotations

import copy
import inspect
import math
from argparse import Namespace
from contextlib import suppress
from functools import partial

import timm
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import random_seed

from rsb.data.loader import sample_seed, seed_all, stream_seed  # the project's seeds (see the module docstring)

# train.py's argparse defaults, for the options its components read (train.py: "Model parameters" ... "Misc").
TRAIN_PY_DEFAULTS = dict(
    model="resnet50", pretrained=False, pretrained_path=None, initial_checkpoint="", num_classes=None, gp=None, img_size=None,
    in_chans=None, input_size=None, crop_pct=None, mean=None, std=None, interpolation="", batch_size=128,
    grad_accum_steps=1, model_kwargs={}, torchscript=False,
    opt="sgd", opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=2e-5, clip_grad=None, clip_mode="norm",
    layer_decay=None, opt_kwargs={},
    sched="cosine", sched_on_updates=False, lr=None, lr_base=0.1, lr_base_size=256, lr_base_scale="",
    lr_noise=None, lr_noise_pct=0.67, lr_noise_std=1.0, lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1,
    lr_k_decay=1.0, warmup_lr=1e-5, min_lr=0.0, epochs=300, decay_milestones=[90, 180, 270], decay_epochs=90,
    warmup_epochs=5, warmup_prefix=False, cooldown_epochs=0, patience_epochs=10, decay_rate=0.1,
    no_aug=False, scale=[0.08, 1.0], ratio=[3.0 / 4.0, 4.0 / 3.0], hflip=0.5, vflip=0.0, color_jitter=0.4, aa=None,
    aug_repeats=0, aug_splits=0, jsd_loss=False, bce_loss=False, bce_target_thresh=None, reprob=0.0,
    remode="pixel", recount=1, resplit=False, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0,
    mixup_switch_prob=0.5, mixup_mode="batch", mixup_off_epoch=0, smoothing=0.1, train_interpolation="random",
    drop=0.0, drop_path=None, drop_block=None, bn_momentum=None, bn_eps=None, dist_bn="reduce",
    model_ema=False, seed=42, amp=False, amp_dtype="float16", channels_last=False, eval_metric="top1",
)
NOT_TRAIN_PY = {"test_img_size"}  # recipe keys that are validate.py's (the eval size), not train.py's


def args_for(params: dict, recipe: str, arch: str, num_classes: int, micro_batch: int, world: int, accum: int,
             precision: str = "fp32", pretrained_path: str | None = None) -> Namespace:
    """train.py's `args` for one recipe of params.yaml, run on `world` processes accumulating `accum` micro-batches;
    with `pretrained_path`, the transfer study's fine-tune: `--pretrained --pretrained-path`, and the study's
    transfer.epochs / transfer.lr_factor in place of scale's (where not null)."""
    rec, scale = params["recipes"][recipe], dict(params["scale"])
    if pretrained_path:
        for key, own in (("epochs", "epochs"), ("lr_factor", "lr_factor")):
            if params["transfer"][own] is not None:
                scale[key] = params["transfer"][own]
    unknown = set(rec) - set(TRAIN_PY_DEFAULTS) - NOT_TRAIN_PY
    assert not unknown, f"recipe keys that are not train.py options: {unknown}"
    args = Namespace(**{**copy.deepcopy(TRAIN_PY_DEFAULTS), **{k: v for k, v in rec.items() if k not in NOT_TRAIN_PY}})
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
    args.batch_size, args.grad_accum_steps, args.world_size = micro_batch, accum, world
    assert micro_batch * accum * world == scale["batch_size"], "the reference runs the params' global batch"
    args.sched_on_updates = True  # rsb steps the schedule per update (timm's --sched-on-updates)
    args.amp = rec["amp"] and precision != "fp32"
    args.amp_dtype = {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float16")
    # train.py: `if not args.lr:` the lr comes from lr_base and the global batch; the recipe's lr is the paper's at
    # its own batch size, so lr_base = recipe lr, lr_base_size = recipe batch
    if scale["lr_rule"] == "none":
        args.lr = rec["lr"]
    else:
        args.lr, args.lr_base, args.lr_base_size, args.lr_base_scale = None, rec["lr"], rec["batch_size"], scale["lr_rule"]
        global_batch_size = args.batch_size * args.world_size * args.grad_accum_steps
        batch_ratio = global_batch_size / args.lr_base_size
        if args.lr_base_scale == "sqrt":
            batch_ratio = batch_ratio ** 0.5
        args.lr = args.lr_base * batch_ratio
    args.lr *= scale.get("lr_factor", 1.0)  # the mini run's own factor (1 = the paper)
    return args


def create_model(args: Namespace) -> torch.nn.Module:
    random_seed(args.seed, 0)  # train.py: utils.random_seed(args.seed, args.rank); DDP broadcasts rank 0's weights
    factory_kwargs = {}
    if args.pretrained_path:  # train.py: "merge with pretrained_cfg of model, 'file' has priority over 'url'"
        factory_kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path, num_classes=-1)  # head adaptation
    return timm.create_model(args.model, pretrained=args.pretrained, in_chans=3, num_classes=args.num_classes,
                             drop_rate=args.drop, drop_path_rate=args.drop_path, drop_block_rate=args.drop_block,
                             global_pool=args.gp, bn_momentum=args.bn_momentum, bn_eps=args.bn_eps,
                             scriptable=args.torchscript, checkpoint_path=args.initial_checkpoint,
                             **factory_kwargs, **args.model_kwargs)


def create_optimizer(model: torch.nn.Module, args: Namespace) -> torch.optim.Optimizer:
    return create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)


def create_scheduler(optimizer: torch.optim.Optimizer, args: Namespace, updates_per_epoch: int):
    scheduler, _ = create_scheduler_v2(optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch)
    return scheduler


def mixup_active(args: Namespace) -> bool:
    return args.mixup > 0 or args.cutmix > 0.0 or args.cutmix_minmax is not None


def create_mixup(args: Namespace) -> Mixup | None:
    if not mixup_active(args):
        return None
    mixup_args = dict(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                      prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                      label_smoothing=args.smoothing, num_classes=args.num_classes)
    return Mixup(**mixup_args)


def create_loss(args: Namespace) -> torch.nn.Module:
    """train.py's branch (no JSD): with Mixup active, smoothing is handled by the Mixup target transform."""
    if mixup_active(args):
        return BinaryCrossEntropy(target_threshold=args.bce_target_thresh) if args.bce_loss \
            else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing, target_threshold=args.bce_target_thresh) \
            if args.bce_loss else LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return torch.nn.CrossEntropyLoss()


def train_transform(args: Namespace, model: torch.nn.Module):
    """create_loader(is_training=True, ...) with train.py's arguments, as create_loader hands them on."""
    data_config = resolve_data_config(vars(args), model=model)
    train_interpolation = args.train_interpolation
    if args.no_aug or not train_interpolation:
        train_interpolation = data_config["interpolation"]
    return create_transform(data_config["input_size"], is_training=True, no_aug=args.no_aug, scale=args.scale,
                            ratio=args.ratio, hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter,
                            auto_augment=args.aa, interpolation=train_interpolation, mean=data_config["mean"],
                            std=data_config["std"], re_prob=args.reprob, re_mode=args.remode, re_count=args.recount,
                            re_num_splits=0, use_prefetcher=False, separate=False)


def create_sampler(dataset, args: Namespace, num_replicas: int, rank: int):
    """create_loader(distributed=True, is_training=True): RepeatAugSampler with repeats, else DistributedSampler."""
    if args.aug_repeats:
        return RepeatAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=args.aug_repeats)
    return torch.utils.data.distributed.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank)


def amp_autocast(args: Namespace, device: torch.device):
    if not args.amp:
        return suppress
    return partial(torch.autocast, device_type=device.type,
                   dtype=torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16)


class Reference:
    """train.py on `virtual` processes with no accumulation, simulated in one: each process has its model replica
    (its own BatchNorm statistics, as DDP with --no-ddp-bb) and its own random streams; DDP averages the gradients;
    one optimizer steps; after each epoch `distribute_bn(reduce=True)` averages the statistics."""

    def __init__(self, args: Namespace, dataset, virtual: int, device=torch.device("cpu")):
        self.args, self.dataset, self.virtual, self.device = args, dataset, virtual, device
        self.model = create_model(args).to(device)
        if args.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.replicas = [copy.deepcopy(self.model) for _ in range(virtual)]
        self.optimizer = create_optimizer(self.model, args)
        self.samplers = [create_sampler(dataset, args, virtual, v) for v in range(virtual)]
        self.updates_per_epoch = min(len(s) for s in self.samplers) // args.batch_size
        self.scheduler = create_scheduler(self.optimizer, args, self.updates_per_epoch)
        self.loss_fn, self.mixup_fn = create_loss(args), create_mixup(args)
        self.autocast = amp_autocast(args, device)
        self.num_updates = 0
        self.log: list[dict] = []  # per update: loss (mean over the global batch), lr used, averaged gradients

    def micro_batch(self, v: int, stream: list[int], seed: int, u: int):
        mb = self.args.batch_size
        samples = []
        for p in range(u * mb, (u + 1) * mb):
            seed_all(sample_seed(seed, p))
            samples.append(self.dataset[stream[p]])
        return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples])

    def train_epoch(self, epoch: int) -> None:
        streams, seeds, rng = [], [], []
        for v, sampler in enumerate(self.samplers):
            sampler.set_epoch(epoch)
            streams.append(list(sampler))
            seeds.append(stream_seed(self.args.seed, epoch, v))
            seed_all(seeds[-1])
            rng.append(_rng_state())
        for rep in self.replicas:
            rep.train()
        for u in range(self.updates_per_epoch):
            losses = []
            for v, rep in enumerate(self.replicas):
                x, y = self.micro_batch(v, streams[v], seeds[v], u)
                _set_rng_state(rng[v])
                x, y = x.to(self.device), y.to(self.device)
                if self.mixup_fn is not None:
                    x, y = self.mixup_fn(x, y)
                if self.args.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with self.autocast():
                    loss = self.loss_fn(rep(x), y)
                loss.backward()
                rng[v] = _rng_state()
                losses.append(loss.detach().float())
            self._update(torch.stack(losses).mean().item())
        self._distribute_bn()

    def _update(self, loss: float) -> None:
        params = [p for p in self.model.parameters()]
        for i, p in enumerate(params):  # DDP: all-reduce (sum) / world
            p.grad = torch.stack([list(r.parameters())[i].grad for r in self.replicas]).mean(0)
        lr = self.optimizer.param_groups[0]["lr"]
        grads = [p.grad.detach().clone() for g in self.optimizer.param_groups for p in g["params"]]
        self.optimizer.step()
        self.optimizer.zero_grad()
        for r in self.replicas:
            r.zero_grad(set_to_none=True)
            for a, b in zip(r.parameters(), params):
                a.data.copy_(b.data)
        self.num_updates += 1
        self.scheduler.step_update(num_updates=self.num_updates)
        self.log.append({"loss": loss, "lr": lr, "grads": grads})

    def _distribute_bn(self) -> None:
        """timm.utils.distribute_bn(model, world_size, reduce=True) over the simulated processes."""
        for name, buf in self.model.named_buffers():
            if "running_mean" in name or "running_var" in name:
                reps = [dict(r.named_buffers())[name] for r in self.replicas]
                buf.copy_(torch.stack(reps).sum(0) / float(self.virtual))
                for b in reps:
                    b.copy_(buf)


def _rng_state():
    import random

    import numpy as np
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def _set_rng_state(state) -> None:
    import random

    import numpy as np
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])

