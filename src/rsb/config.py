"""params.yaml -> frozen dataclasses, validated when loaded: an unknown key or a bad value is one clear error.

The recipes stay exactly as the paper states them (keys named as timm's train.py options); `scale` says how this run
shrinks them, and `resolve()` applies it, so the values actually used are one object that every run logs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rsb.data.mini import MiniSpec


class ConfigError(ValueError):
    """A params.yaml problem, phrased as the key, what it holds, and what to do."""


@dataclass(frozen=True)
class Recipe:
    """One of the paper's recipes, verbatim (timm train.py option names)."""
    epochs: int
    img_size: int
    test_img_size: int
    crop_pct: float
    batch_size: int
    opt: str
    lr: float
    weight_decay: float
    sched: str
    warmup_epochs: float
    warmup_lr: float
    min_lr: float
    bce_loss: bool
    bce_target_thresh: float
    smoothing: float
    drop_path: float
    aug_repeats: int
    aa: str
    mixup: float
    cutmix: float
    reprob: float
    hflip: float
    model_ema: bool
    amp: bool

    def check(self, where: str) -> None:
        _positive(where, epochs=self.epochs, img_size=self.img_size, test_img_size=self.test_img_size,
                  batch_size=self.batch_size, lr=self.lr)
        if not 0 < self.crop_pct <= 1:
            raise ConfigError(f"{where}.crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.opt != "lamb" or self.sched != "cosine" or not self.bce_loss:
            raise ConfigError(f"{where}: this pipeline implements the paper's LAMB + cosine + BCE recipes; got "
                              f"opt={self.opt!r}, sched={self.sched!r}, bce_loss={self.bce_loss}")
        if self.model_ema:
            raise ConfigError(f"{where}.model_ema: EMA is not part of the paper's A1/A2/A3; set it to false")
        if self.aug_repeats < 0 or not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"{where}: need aug_repeats >= 0 and 0 <= warmup_epochs < epochs")


@dataclass(frozen=True)
class Scale:
    """How this run shrinks the paper's recipes. epochs=1, img_size=224, batch_size=2048 is the paper."""
    epochs: float = 1.0        # factor on each recipe's epochs and warmup (A1:A2:A3 keep their 6:3:1 budget)
    min_epochs: int = 1
    img_size: int = 224        # what the paper's 224 becomes; other sizes (A3's 160) scale in proportion
    batch_size: int = 2048     # global batch
    lr_rule: str = "sqrt"      # lr follows batch: sqrt (timm's rule for LAMB/Adam), linear, none
    lr_factor: float = 1.0     # a further factor for runs of very few updates (the mini default); 1 = the paper

    def check(self) -> None:
        _positive("scale", epochs=self.epochs, min_epochs=self.min_epochs, img_size=self.img_size,
                  batch_size=self.batch_size, lr_factor=self.lr_factor)
        if self.lr_rule not in ("sqrt", "linear", "none"):
            raise ConfigError(f"scale.lr_rule must be sqrt, linear or none, got {self.lr_rule!r}")


@dataclass(frozen=True)
class Data:
    source: str = "mini"       # mini | imagenet
    raw: str = "data/mini"     # folder holding the official archives and real.json
    prepared: str = "data/prepared"
    verify_md5: bool = False   # check real archives against the published md5 sums (slow: ~150 GB)
    mini: MiniSpec = field(default_factory=MiniSpec)

    def check(self) -> None:
        if self.source not in ("mini", "imagenet"):
            raise ConfigError(f"data.source must be 'mini' or 'imagenet', got {self.source!r}")


@dataclass(frozen=True)
class Train:
    """The machine side of training: nothing here changes the recipe's math."""
    devices: int = 1           # processes per node (GPUs; CPU processes without a GPU)
    nodes: int = 1
    hostfile: str = "hostfile"  # DeepSpeed hostfile for multi-node; ignored when absent
    master_port: int = 0       # rendezvous port; 0 = a free one (concurrent runs on one machine)
    micro_batch: int = 32      # per device; accumulation = global batch / (micro_batch * devices * nodes)
    precision: str = "auto"    # auto | bf16 | fp16 | fp32 (autocast; weights stay fp32)
    channels_last: bool = True
    compile: bool = False
    workers: int = 1
    threads: int = 0           # torch threads per process; 0 = cores / local processes
    eval_every: int = 1        # val top-1 every N epochs; 0 = at the end only
    zero_stage: int = 0
    seed: int = 0

    def check(self) -> None:
        _positive("train", devices=self.devices, nodes=self.nodes, micro_batch=self.micro_batch)
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"train.precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.zero_stage != 0:
            raise ConfigError(
                f"train.zero_stage={self.zero_stage}: ZeRO >= 1 flattens and partitions parameters, so LAMB's "
                "per-tensor trust ratio is computed over shards instead of tensors and the recipe's math changes "
                "(measured: losses differ from the second step). ResNets fit in memory: keep zero_stage: 0.")
        if self.workers < 0 or self.threads < 0 or self.eval_every < 0:
            raise ConfigError("train.workers, train.threads and train.eval_every must be >= 0")


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = 100
    workers: int = 1

    def check(self) -> None:
        _positive("evaluate", batch_size=self.batch_size)


@dataclass(frozen=True)
class Benchmark:
    batch_size: int = 128
    img_size: int = 224
    warmup: int = 2
    repeats: int = 5
    precision: str = "auto"
    channels_last: bool = True

    def check(self) -> None:
        _positive("benchmark", batch_size=self.batch_size, img_size=self.img_size, repeats=self.repeats)
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ConfigError(f"benchmark.precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")


@dataclass(frozen=True)
class Params:
    experiment: str
    models: tuple[str, ...]
    run: tuple[str, ...]
    recipes: dict[str, Recipe]
    scale: Scale = field(default_factory=Scale)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    benchmark: Benchmark = field(default_factory=Benchmark)

    def check(self) -> None:
        for name, recipe in self.recipes.items():
            recipe.check(f"recipes.{name}")
        for name in self.run:
            if name not in self.recipes:
                raise ConfigError(f"run lists recipe {name!r}, which is not under recipes ({', '.join(self.recipes)})")
        for part in (self.scale, self.data, self.train, self.evaluate, self.benchmark):
            part.check()

    def recipe(self, name: str) -> Recipe:
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}: params.yaml has {', '.join(sorted(self.recipes))}")
        return self.recipes[name]


def _positive(where: str, **values) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"{where}.{key} must be > 0, got {value}")


def _convert(tp, value, where: str):
    """Convert a YAML value to the annotated type, naming the key on a mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ConfigError(f"unknown key {where}.{unknown[0]} (known: {', '.join(sorted(names))})")
        missing = [f.name for f in dataclasses.fields(tp) if f.name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"missing key {where}.{missing[0]}")
        try:
            return tp(**{k: _convert(hints[k], v, f"{where}.{k}") for k, v in value.items()})
        except ValueError as e:  # a dataclass's own __post_init__ check
            raise ConfigError(f"{where}: {e}") from None
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{where} must be a non-empty list, got {value!r}")
        return tuple(_convert(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    try:
        params = _convert(Params, raw, "params")
        params.check()
    except ConfigError as e:
        raise ConfigError(f"{source}: {str(e).replace('params.', '', 1)}") from None
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return parse_params(raw or {}, str(path))


@dataclass(frozen=True)
class Resolved:
    """A recipe as this run executes it: the paper's values after `scale`, plus the machine side."""
    arch: str
    recipe_name: str
    recipe: Recipe             # verbatim, for the record
    epochs: int
    warmup_epochs: float
    img_size: int
    test_img_size: int
    batch_size: int
    lr: float
    micro_batch: int
    grad_accum: int
    world_size: int
    train: Train

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """What a checkpoint must match to be resumed: everything that changes the math (not workers/threads)."""
        d = self.to_dict()
        del d["world_size"], d["grad_accum"]  # same micro-batches on any world size (MicroBatchSampler)
        for k in ("workers", "threads", "eval_every", "hostfile", "master_port", "devices", "nodes"):
            d["train"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_arch(params: Params, arch: str) -> None:
    """Architectures are checked where timm is loaded anyway (train, benchmark), not on every params load."""
    import timm

    if arch not in params.models:
        raise ConfigError(f"architecture {arch!r} is not under models in params.yaml ({', '.join(params.models)})")
    if not timm.is_model(arch):
        raise ConfigError(f"models: {arch!r} is not a timm architecture (see timm.list_models('{arch[:6]}*'))")


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def use_cuda() -> bool:
    """Train and evaluate on CUDA where it is, unless DeepSpeed's accelerator is forced to the CPU
    (DS_ACCELERATOR=cpu), so that DeepSpeed, the model and the data agree on one device."""
    import os

    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def auto_precision(cuda: bool | None = None, cuda_bf16: bool | None = None, flags: set[str] | None = None) -> str:
    """The paper's mixed precision where the hardware has it: bf16 on GPUs that support it, fp16 before Ampere; on a
    CPU bf16 only with native bf16 instructions (AVX512-BF16 or AMX). `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
    is True on any AVX-512 CPU, also where bf16 is emulated and 1.3-3.3x slower than fp32 (measured, DESIGN.md).
    The arguments are for tests; by default they are read from this machine."""
    import torch

    cuda = use_cuda() if cuda is None else cuda
    if cuda:
        return "bf16" if (torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16) else "fp16"
    flags = cpu_flags() if flags is None else flags
    return "bf16" if any(f in flags for f in NATIVE_BF16_FLAGS) else "fp32"


def scaled_size(size: int, scale: Scale) -> int:
    return max(8, round(size * scale.img_size / 224))


def resolve(params: Params, arch: str, recipe_name: str, world_size: int | None = None) -> Resolved:
    """Apply `scale` to a recipe and check the global batch against the devices."""
    check_arch(params, arch)
    r, s, t = params.recipe(recipe_name), params.scale, params.train
    world = world_size or t.devices * t.nodes
    epochs = max(s.min_epochs, round(r.epochs * s.epochs))
    lr = s.lr_factor * r.lr * {"sqrt": math.sqrt(s.batch_size / r.batch_size), "linear": s.batch_size / r.batch_size,
                               "none": 1.0}[s.lr_rule]
    if s.batch_size % (t.micro_batch * world):
        raise ConfigError(
            f"scale.batch_size={s.batch_size} is not micro_batch x devices x accumulation: train.micro_batch="
            f"{t.micro_batch} x {world} processes does not divide it; change train.micro_batch or train.devices")
    if t.micro_batch % 2 and (r.mixup or r.cutmix):
        raise ConfigError(f"train.micro_batch={t.micro_batch}: Mixup/CutMix need an even batch per device")
    if not r.amp:  # the recipe trains in fp32 whatever the machine offers
        t = dataclasses.replace(t, precision="fp32")
    elif t.precision == "auto":
        t = dataclasses.replace(t, precision=auto_precision())
    return Resolved(arch=arch, recipe_name=recipe_name, recipe=r, epochs=epochs,
                    warmup_epochs=r.warmup_epochs * epochs / r.epochs, img_size=scaled_size(r.img_size, s),
                    test_img_size=scaled_size(r.test_img_size, s), batch_size=s.batch_size, lr=lr,
                    micro_batch=t.micro_batch, grad_accum=s.batch_size // (t.micro_batch * world), world_size=world,
                    train=t)


def flatten(d: dict, prefix: str = "") -> dict[str, object]:
    """{'a': {'b': 1}} -> {'a.b': 1}: MLflow params and tags are flat."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out

