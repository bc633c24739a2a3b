"""params.yaml -> frozen dataclasses, validated when loaded: an unknown key or a bad value is one clear error.

The recipes stay exactly as the paper states them (keys named as timm's train.py options); `scale` says how this run
shrinks them, and `resolve()` applies it, so the values actually used are one object that every run logs.

Longer than ~300 lines on purpose: this is the one declaration of every params.yaml key, each with its domain and
source (the README's domains table is rendered from it), beside the loading and resolving that read them; split, a
key's domain and its use would live in two rooms.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from rsb import domains as D
from rsb.data.spec import Data
from rsb.paramfile import ConfigError, check_domains, convert, read_yaml


def _optimizer(v: str) -> bool:
    import timm.optim

    return v in timm.optim.list_optimizers()


def _sched(v: str) -> bool:
    return v in ("cosine", "tanh", "step", "multistep", "plateau", "poly", "rsqrt", "constant")  # create_scheduler_v2


def _augment(v: str) -> bool:
    """timm's own parser, then one application: timm accepts some malformed strings until it applies them. Its
    parsers also skip, without a word, any segment with no digit in it (`rand-m9-mstd-inc1` trains with timm's
    default magnitude noise; `rand-m9--inc1`, `rand-m9-foo`): such a segment is refused here (RandAugment's
    `t<names>` segment, which needs none, excepted)."""
    head, *segments = v.split("-")
    if any(
        not re.search(r"\d", seg) and not (head == "rand" and seg.startswith("t") and len(seg) > 1) for seg in segments
    ):
        return False
    from PIL import Image
    from timm.data import create_transform

    from rsb import compat

    compat.posterize_with_zero_bits()  # as the training transforms run it
    create_transform(32, is_training=True, auto_augment=v)(Image.new("RGB", (40, 40)))
    return True


def _arch(v: str) -> bool:
    import timm

    return timm.is_model(v)


PROBABILITY = D.number(0, 1)
PRECISIONS = D.one_of("auto", "bf16", "fp16", "fp32")
TRAIN_PY = "timm train.py option"


@dataclass(frozen=True)
class Recipe:
    """One of the paper's recipes, verbatim (timm train.py option names)."""

    epochs: int = D.param(domain=D.number(1, integer=True), source=f"{TRAIN_PY} --epochs")
    img_size: int = D.param(domain=D.number(8, integer=True), source=f"{TRAIN_PY} --img-size")
    test_img_size: int = D.param(domain=D.number(8, integer=True), source="the eval size (validate.py --img-size)")
    crop_pct: float = D.param(
        domain=D.number(0, 1, lo_open=True), source="timm create_transform: resize = size/crop_pct"
    )
    batch_size: int = D.param(domain=D.number(1, integer=True), source="the paper's global batch (lr_base_size)")
    opt: str = D.param(
        domain=D.timm_name("a timm optimizer (timm.optim.list_optimizers())", _optimizer, "lamb", "lamb2"),
        source=f"{TRAIN_PY} --opt (create_optimizer_v2 with its defaults: eps, betas, momentum 0.9)",
    )
    lr: float = D.param(domain=D.number(0, lo_open=True), source=f"{TRAIN_PY} --lr (at batch_size)")
    weight_decay: float = D.param(domain=D.number(0), source=f"{TRAIN_PY} --weight-decay")
    sched: str = D.param(
        domain=D.timm_name("a timm scheduler (create_scheduler_v2)", _sched, "cosine", "cosin"),
        source=f"{TRAIN_PY} --sched; this pipeline runs cosine",
    )
    warmup_epochs: float = D.param(
        domain=D.number(0, hi_field="epochs", hi_open=True),
        source=f"{TRAIN_PY} --warmup-epochs; warmup must end before training does",
    )
    warmup_lr: float = D.param(
        domain=D.number(0, hi_field="lr"), source=f"{TRAIN_PY} --warmup-lr; timm ramps linearly from it up to lr"
    )
    min_lr: float = D.param(domain=D.number(0, hi_field="lr"), source=f"{TRAIN_PY} --min-lr; the cosine decays to it")
    bce_loss: bool = D.param(
        domain=D.flag(),
        source=f"{TRAIN_PY} --bce-loss; false: cross-entropy (SoftTargetCrossEntropy "
        "under Mixup, else LabelSmoothingCrossEntropy or CrossEntropyLoss)",
    )
    bce_target_thresh: float | None = D.param(
        domain=D.optional(D.number(0, 1, lo_open=True, hi_open=True), "no threshold"),
        source="timm BinaryCrossEntropy: targets > thresh become 1, the rest 0",
    )
    smoothing: float = D.param(domain=D.number(0, 1, hi_open=True), source="timm Mixup label_smoothing")
    drop_path: float = D.param(domain=D.number(0, 1, hi_open=True), source="timm create_model drop_path_rate")
    aug_repeats: int = D.param(domain=D.number(0, integer=True), source="timm RepeatAugSampler num_repeats (0: off)")
    aa: str | None = D.param(
        domain=D.optional(
            D.timm_name(
                "a timm auto-augment string (rand-m7-mstd0.5-inc1, ...)",
                _augment,
                "rand-m7-mstd0.5-inc1",
                "rand-m7-mstd0.5-inc1x",
            ),
            "none: train.py's colour jitter 0.4 instead",
        ),
        source="timm create_transform auto_augment",
    )
    mixup: float = D.param(domain=D.number(0), source="timm Mixup mixup_alpha (Beta distribution; 0: off)")
    cutmix: float = D.param(domain=D.number(0), source="timm Mixup cutmix_alpha (0: off)")
    reprob: float = D.param(domain=PROBABILITY, source="timm RandomErasing probability")
    hflip: float = D.param(domain=PROBABILITY, source="timm create_transform hflip probability")
    model_ema: bool = D.param(
        domain=D.flag(),
        source=(
            "DeiT main.py --model-ema: timm's ModelEma (the class DeiT uses) updated after each update; not part of "
            "A1-A3; only in the procedures study (its stages declare the EMA's weights)"
        ),
    )
    amp: bool = D.param(domain=D.flag(), source=f"{TRAIN_PY} --amp; false: fp32 whatever train.precision says")
    train_interpolation: str = D.param(
        "random",
        domain=D.one_of("random", "bilinear", "bicubic"),
        source=f"{TRAIN_PY} --train-interpolation (its default: random)",
    )
    model_ema_decay: float = D.param(
        0.9998,
        domain=D.number(0, 1, lo_open=True, hi_open=True),
        source="DeiT main.py --model-ema-decay (0.99996), per update at the paper's scale; rescaled by `scale`",
    )
    model_ema_force_cpu: bool = D.param(
        False, domain=D.flag(), source="DeiT main.py --model-ema-force-cpu: the EMA kept on the CPU"
    )

    def check(self, where: str) -> None:
        """What the pipeline implements, beyond each key's own domain."""
        if self.sched != "cosine":  # train.py hands other schedulers decay/cycle options this pipeline does not pass
            raise ConfigError(
                f"{where}.sched = {self.sched!r}: this pipeline runs timm's cosine schedule (the "
                "paper's and DeiT's); set 'cosine'"
            )


@dataclass(frozen=True)
class Scale:
    """How this run shrinks the paper's recipes. epochs=1, img_size=224, batch_size=2048 is the paper."""

    epochs: float = D.param(
        1.0,
        domain=D.number(0, lo_open=True),
        source="factor on each recipe's epochs and warmup (A1:A2:A3 keep their 6:3:1 budget)",
    )
    min_epochs: int = D.param(1, domain=D.number(1, integer=True), source="floor on the scaled epochs")
    img_size: int = D.param(
        224,
        domain=D.number(8, integer=True),
        source="what the paper's 224 becomes; other sizes (A3's 160) in proportion",
    )
    batch_size: int = D.param(2048, domain=D.number(1, integer=True), source="global batch")
    lr_rule: str = D.param(
        "sqrt",
        domain=D.one_of("sqrt", "linear", "none"),
        source="timm train.py --lr-base-scale (sqrt, linear), or none: the recipe's lr",
    )
    lr_factor: float = D.param(
        1.0, domain=D.number(0, lo_open=True), source="a further lr factor for runs of very few updates; 1 = the paper"
    )


IMAGENET_TRAIN_IMAGES = 1_281_167  # ILSVRC2012 train: the paper's epoch
EVERY = re.compile(r"(\d+)\s*min")


def parse_every(value: int | str) -> tuple[int, float]:
    """train.checkpoint_every as (updates, seconds): 0 = only at epoch ends, N = every N updates, "N min" = every N
    minutes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value, 0.0
    m = EVERY.fullmatch(str(value).strip())
    if isinstance(value, bool) or not m or int(m.group(1)) < 1:
        raise ConfigError(
            f"train.checkpoint_every = {value!r}: use 0 (epoch ends only), a number of updates, or minutes as '30min'"
        )
    return 0, 60.0 * int(m.group(1))


def _every_ok(v) -> bool:
    try:
        parse_every(v)
    except ConfigError:
        return False
    return True


@dataclass(frozen=True)
class Train:
    """The machine side of training: nothing here changes the recipe's math."""

    devices: int = D.param(
        1,
        domain=D.number(1, integer=True),
        source="processes per node (GPUs; CPU processes without one); DeepSpeed checks the GPUs",
    )
    nodes: int = D.param(1, domain=D.number(1, integer=True), source="nodes; rsb.launch checks the hostfile")
    hostfile: str = D.param("hostfile", domain=D.text(), source="DeepSpeed hostfile (multi-node)")
    launcher: str = D.param(
        "pdsh",
        domain=D.one_of("pdsh", "no_ssh", "slurm"),
        source="multi-node: DeepSpeed over ssh (pdsh), its --no_ssh mode, or srun in a SLURM job",
    )
    master_addr: str = D.param(
        "auto", domain=D.text(), source="rank 0's address for no_ssh/slurm; auto = MASTER_ADDR or the first host"
    )
    master_port: int = D.param(0, domain=D.number(0, 65535, integer=True), source="TCP port; 0 = a free one")
    micro_batch: int = D.param(32, domain=D.number(1, integer=True), source="per device; accumulation makes the rest")
    precision: str = D.param("auto", domain=PRECISIONS, source="autocast dtype; weights stay fp32")
    channels_last: bool = D.param(True, domain=D.flag(), source=f"{TRAIN_PY} --channels-last")
    compile: bool = D.param(False, domain=D.flag(), source="torch.compile through DeepSpeed")
    workers: int | str = D.param(
        "auto",
        domain=D.auto_or(D.number(0, integer=True)),
        source="DataLoader workers per process; auto = the node's cores per GPU on GPUs, 1 on the CPU",
    )
    prefetcher: bool | str = D.param(
        "auto",
        domain=D.auto_or(D.flag()),
        source=(
            f"{TRAIN_PY}'s prefetcher (uint8 batches, normalization, erasing and FastCollateMixup as "
            "create_loader builds them); auto = on with CUDA"
        ),
    )
    threads: int = D.param(
        0, domain=D.number(0, integer=True), source="torch threads per process; 0 = cores / processes"
    )
    eval_every: int = D.param(1, domain=D.number(0, integer=True), source="val top-1 every N epochs; 0 = at the end")
    stall_s: int = D.param(
        1800,
        domain=D.number(0, integer=True),
        source=(
            "seconds a rank (or the evaluate or benchmark stage) may go without a batch or an update before it dumps "
            "its stacks and stops; 0 = off"
        ),
    )
    checkpoint_every: int | str = D.param(
        0,
        domain=D.Domain(
            "0 (epoch ends only), an integer >= 1 (updates), or minutes as '<N>min'",
            lambda v, h: _every_ok(v),
            lambda h: [0, 500, "30min"],
            lambda h: [-1, "30", "0min", 1.5],
        ),
        source="a checkpoint inside the epoch as well (resumed bit-identically); at epoch ends always",
    )
    keep_checkpoints: int = D.param(
        1, domain=D.number(1, integer=True), source="the newest N complete checkpoints stay; older ones go after"
    )
    slurm_signal_s: int = D.param(
        300,
        domain=D.number(0, integer=True),
        source=(
            "train.launcher slurm: srun --signal=USR1@N asks SLURM for SIGUSR1 N s before the time limit; the run "
            "saves at its next update and requeues the job (0: no signal)"
        ),
    )
    slots: int = D.param(
        0,
        domain=D.number(0, integer=True),
        source=(
            "trainings sharing this node at once (dvc queue start -j N): each claims one of N slots of its GPUs (or "
            "cores) and uses only those; 0 = the whole node (rsb.claim)"
        ),
    )
    zero_stage: int = D.param(
        0,
        domain=D.one_of(0, 1, 2),
        source=(
            "DeepSpeed ZeRO 1/2 partitions flattened optimizer state and gradients: only with an element-wise "
            "optimizer (adam, adamw); with LAMB the per-tensor trust ratio would be computed over shards (refused at "
            "the stage)"
        ),
    )
    seed: int = D.param(0, domain=D.number(0, 2**31 - 1, integer=True), source="torch/NumPy seeds take 0..2^31-1")


@dataclass(frozen=True)
class Evaluate:
    batch_size: int = D.param(
        100, domain=D.number(1, integer=True), source="eval batch, also between epochs (no effect on the scores)"
    )
    workers: int = D.param(1, domain=D.number(0, integer=True), source="DataLoader workers")


@dataclass(frozen=True)
class Benchmark:
    batch_size: int = D.param(128, domain=D.number(1, integer=True), source="the paper's figure 4: 128")
    img_size: int = D.param(224, domain=D.number(8, integer=True), source="the paper's figure 4: 224")
    warmup: int = D.param(2, domain=D.number(0, integer=True), source="untimed batches first")
    repeats: int = D.param(5, domain=D.number(1, integer=True), source="timed batches (median)")
    precision: str = D.param("auto", domain=PRECISIONS, source="autocast dtype")
    channels_last: bool = D.param(True, domain=D.flag(), source="memory layout")


def _seed_list(v, h) -> bool:
    return (
        bool(v)
        and len(set(v)) == len(v)
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**31 for x in v)
    )


@dataclass(frozen=True)
class Seeds:
    """The seed study (paper figures 5-6): one (arch, recipe) trained once per seed. studies/dvc.yaml runs it."""

    arch: str = D.param(
        "resnet18",
        domain=D.timm_name("a timm architecture", lambda v: D.NAME.fullmatch(v) and _arch(v), "resnet18", "resnet5O"),
        source="timm.is_model; the paper: resnet50",
    )
    recipe: str = D.param(
        "a3",
        domain=D.Domain(
            "a recipe name under recipes",
            lambda v, h: isinstance(v, str) and bool(D.NAME.fullmatch(v)),
            lambda h: ["a1", "a2"],
            lambda h: ["a-1", ""],
        ),
        source="the paper: a2",
    )
    seeds: tuple[int, ...] = D.param(
        (1, 2, 3, 4, 5, 6, 7, 8),
        domain=D.Domain(
            "a non-empty list of distinct integers in [0, 2147483647]",
            _seed_list,
            lambda h: [(1, 2), (0,)],
            lambda h: [(), (1, 1), (-1,), (2**31,)],
        ),
        source="train.seed per run; the paper: 1..100 (its other runs use seed 0)",
    )


@dataclass(frozen=True)
class Procedures:
    """The recipe/architecture paradox (paper figure 8): each model trained with each recipe. studies/dvc.yaml."""

    models: tuple[str, ...] = D.param(
        ("resnet50", "deit_small_patch16_224"),
        domain=D.unique(D.name(), "resnet18"),
        source="timm architectures (timm decides); the paper: resnet50, DeiT-S",
    )
    recipes: tuple[str, ...] = D.param(
        ("a2", "t2"), domain=D.unique(D.name(), "a1"), source="recipes under recipes; the paper: A2 and DeiT's T2"
    )


def _weights_map(v, h) -> bool:
    return isinstance(v, dict) and all(
        isinstance(k, str) and D.NAME.fullmatch(k) and k != SCRATCH and isinstance(p, str) and p.strip() == p != ""
        for k, p in v.items()
    )


SCRATCH = "scratch"  # the start that is timm's random initialization


@dataclass(frozen=True)
class Transfer:
    """Transfer learning (paper figure 7): the `recipe` fine-tuning procedure from each start on each downstream
    dataset. studies/dvc.yaml."""

    arch: str = D.param(
        "resnet50",
        domain=D.timm_name("a timm architecture", lambda v: D.NAME.fullmatch(v) and _arch(v), "resnet50", "resnet5O"),
        source="timm.is_model; the paper: resnet50",
    )
    recipe: str = D.param(
        "ft",
        domain=D.Domain(
            "a recipe name under recipes",
            lambda v, h: isinstance(v, str) and bool(D.NAME.fullmatch(v)),
            lambda h: ["ft", "a1"],
            lambda h: ["f-t", ""],
        ),
        source="the fine-tuning procedure (the same for every start and dataset)",
    )
    starts: tuple[str, ...] = D.param(
        (SCRATCH,),
        domain=D.unique(D.name(), SCRATCH),
        source=f"'{SCRATCH}' (timm's initialization) or names under transfer.weights",
    )
    weights: dict[str, str] = D.param(
        domain=D.Domain(
            f"a mapping of start names (not '{SCRATCH}') to weights files",
            _weights_map,
            lambda h: [{n: f"models/resnet50-{n}.safetensors" for n in h.starts if n != SCRATCH}],
            lambda h: [{SCRATCH: "x.pth"}, {"a-1": "x.pth"}, {"a1": ""}],
        ),
        factory=dict,
        source="safetensors, or a weights-only torch file (torchvision's .pth); read, never downloaded",
    )
    root: str = D.param("data/downstream", domain=D.text(), source="folder holding the downstream datasets")
    datasets: tuple[str, ...] = D.param(
        ("patterns", "outlines"),
        domain=D.unique(D.name(), "patterns"),
        source="folders under root, each <name>/train/<class>/..., <name>/val/<class>/...",
    )
    epochs: float | None = D.param(
        None,
        domain=D.optional(D.number(0, lo_open=True), "scale.epochs"),
        source="factor on the fine-tuning recipe's epochs, in place of scale.epochs",
    )
    lr_factor: float | None = D.param(
        None,
        domain=D.optional(D.number(0, lo_open=True), "scale.lr_factor"),
        source="lr factor for fine-tuning, in place of scale.lr_factor",
    )

    def scale(self, scale: Scale) -> Scale:
        """`scale` as the fine-tuning runs apply it."""
        return dataclasses.replace(
            scale, epochs=self.epochs or scale.epochs, lr_factor=self.lr_factor or scale.lr_factor
        )


@dataclass(frozen=True)
class Params:
    experiment: str = D.param(domain=D.text(), source="MLflow experiment name (non-empty)")
    models: tuple[str, ...] = D.param(
        domain=D.unique(D.name(), "resnet18"),
        source="timm architectures (timm decides, before training); names in DVC stage names train@<arch>-<recipe>",
    )
    run: tuple[str, ...] = D.param(domain=D.unique(D.name(), "a1"), source="recipes to run, each under recipes")
    recipes: dict[str, Recipe] = D.param(
        domain=D.Domain(
            "a mapping of recipe names to recipes", lambda v, h: bool(v) and all(D.NAME.fullmatch(k) for k in v)
        ),
        source="recipe names become DVC stage names",
    )
    scale: Scale = field(default_factory=Scale)
    data: Data = field(default_factory=Data)
    train: Train = field(default_factory=Train)
    evaluate: Evaluate = field(default_factory=Evaluate)
    benchmark: Benchmark = field(default_factory=Benchmark)
    seeds: Seeds = field(default_factory=Seeds)
    procedures: Procedures = field(default_factory=Procedures)
    transfer: Transfer = field(default_factory=Transfer)

    def check(self) -> None:
        """What spans sections, after every key's own domain."""
        for name, recipe in self.recipes.items():
            recipe.check(f"recipes.{name}")
        if self.train.zero_stage and self.train.channels_last:
            raise ConfigError(
                f"train.zero_stage = {self.train.zero_stage} with train.channels_last = true: DeepSpeed's "
                "ZeRO flattens gradients with .view(-1), which channels_last convolution gradients "
                "refuse (measured: RuntimeError at the first backward); set train.channels_last: false"
            )
        for key, names in (
            ("run lists", self.run),
            ("seeds.recipe is", (self.seeds.recipe,)),
            ("procedures.recipes lists", self.procedures.recipes),
            ("transfer.recipe is", (self.transfer.recipe,)),
        ):
            for name in names:
                if name not in self.recipes:
                    raise ConfigError(f"{key} recipe {name!r}, which is not under recipes ({', '.join(self.recipes)})")
        for name in self.transfer.starts:
            if name != SCRATCH and name not in self.transfer.weights:
                raise ConfigError(
                    f"transfer.starts lists {name!r}, which is neither '{SCRATCH}' nor under "
                    f"transfer.weights ({', '.join(self.transfer.weights) or 'empty'}); add "
                    f"`{name}: <weights file>` there"
                )

    def recipe(self, name: str) -> Recipe:
        if name not in self.recipes:
            raise ConfigError(f"unknown recipe {name!r}: params.yaml has {', '.join(sorted(self.recipes))}")
        return self.recipes[name]


def check_option(section: type, name: str, value, flag: str) -> None:
    """A command-line value through the domain of the params.yaml key it stands for: one line naming the flag."""
    f = {f.name: f for f in dataclasses.fields(section)}[name]
    d = f.metadata["domain"]
    if value is not None and not d.ok(value, None):
        raise ConfigError(f"{flag} {value!r}: must be {d.text}, as its params.yaml key ({f.metadata['source']})")


def domains_markdown() -> str:
    """The README's table of params.yaml keys: rendered from the declarations, so it cannot drift from them."""
    rows = ["| key | domain | why / source |", "|---|---|---|"]
    rows += [f"| `{k}` | {d} | {s} |" for k, d, s in D.domain_table(Params)]
    return "\n".join(rows)


def check_timm(params: Params, source: str = "params.yaml") -> None:
    """The keys timm's own parsers decide (architectures, auto-augment strings, optimizer and scheduler names), for
    every recipe: milliseconds once timm is imported; the stages with expensive work call it first."""
    try:
        for key, arch in (
            [("models", a) for a in params.models]
            + [("seeds.arch", params.seeds.arch)]
            + [("procedures.models", a) for a in params.procedures.models]
            + [("transfer.arch", params.transfer.arch)]
        ):
            if not _arch(arch):
                raise ConfigError(f"{key}: {arch!r} is not a timm architecture (see timm.list_models('{arch[:6]}*'))")
        for name, recipe in params.recipes.items():  # every recipe: the studies train some that `run` does not list
            check_domains(recipe, f"recipes.{name}.", timm=True)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def parse_params(raw: dict, source: str = "params.yaml") -> Params:
    """Types, then every key's domain, then what spans keys: the first problem is one ConfigError line."""
    try:
        params = convert(Params, raw, "")
        check_domains(params)
        params.check()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return params


def override(raw: dict, values: dict) -> dict:
    """Set dotted keys in a params.yaml mapping, as `dvc exp run -S key=value` does (in place; returns it)."""
    for key, value in values.items():
        *parents, last = key.split(".")
        d = raw
        for k in parents:
            d = d[k]
        d[last] = value
    return raw


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path), str(path))


@dataclass(frozen=True)
class Resolved:
    """A recipe as this run executes it: the paper's values after `scale`, plus the machine side."""

    arch: str
    recipe_name: str
    recipe: Recipe  # verbatim, for the record
    epochs: int
    warmup_epochs: float
    img_size: int
    test_img_size: int
    batch_size: int
    lr: float
    grad_accum: int
    world_size: int
    train: Train
    scale: Scale  # how the recipe was shrunk (params.yaml's, or the transfer study's)

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch

    @property
    def prefetcher(self) -> bool:
        """train.prefetcher with `auto` decided (resolve() does)."""
        assert isinstance(self.train.prefetcher, bool), self.train.prefetcher
        return self.train.prefetcher

    @property
    def workers(self) -> int:
        """train.workers with `auto` decided (resolve() does)."""
        assert isinstance(self.train.workers, int), self.train.workers
        return self.train.workers

    def ema_decay(self, updates: int) -> float:
        """The model EMA's decay per update of a run of `updates` updates. The recipe's decay is per update at the
        paper's scale (the recipe's epochs x ImageNet's 1,281,167 images // the recipe's batch: T2's 187,500); its
        horizon 1/(1 - decay) is kept the same fraction of this run: decay ** (paper updates / `updates`). At the
        paper's scale (scale.epochs 1, batch 2048, ImageNet) it is the recipe's value."""
        paper = self.recipe.epochs * (IMAGENET_TRAIN_IMAGES // self.recipe.batch_size)
        return self.recipe.model_ema_decay ** (paper / updates)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """What a checkpoint must match to be resumed: everything that changes the math (not workers/threads)."""
        d = self.to_dict()
        del d["world_size"], d["grad_accum"]  # same micro-batches on any world size (MicroBatchSampler)
        for k in (
            "workers",
            "threads",
            "eval_every",
            "stall_s",
            "checkpoint_every",
            "keep_checkpoints",
            "slurm_signal_s",
            "slots",
            "hostfile",
            "master_port",
            "devices",
            "nodes",
            "launcher",
            "master_addr",
        ):
            d["train"].pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def check_arch(params: Params, arch: str) -> None:
    if arch not in (*params.models, params.seeds.arch, *params.procedures.models, params.transfer.arch):
        raise ConfigError(
            f"architecture {arch!r} is not under models in params.yaml ({', '.join(params.models)}), "
            "seeds.arch, procedures.models or transfer.arch"
        )
    check_timm(params)


def scaled_size(size: int, scale: Scale) -> int:
    return max(8, round(size * scale.img_size / 224))


# Element-wise optimizers whose update ZeRO 1/2 leaves unchanged (adamw measured bit-identical to stage 0 on one
# process, and equal to train.py on two: tests/test_train.py); LAMB, LARS, NovoGrad, Adafactor work per tensor.
ZERO_SAFE_OPTIMIZERS = ("adam", "adamw")


def resolve(
    params: Params,
    arch: str,
    recipe_name: str,
    world_size: int | None = None,
    seed: int | None = None,
    scale: Scale | None = None,
) -> Resolved:
    """Apply `scale` (params.yaml's unless given: fine-tuning's, `Transfer.scale`) to a recipe and check the global
    batch against the devices; `seed` replaces train.seed (the seed study's runs)."""
    check_arch(params, arch)
    try:  # the recipe trained, whether or not `run` lists it (check_timm covers those in `run`)
        check_domains(params.recipe(recipe_name), f"recipes.{recipe_name}.", timm=True)
    except ConfigError as e:
        raise ConfigError(f"params.yaml: {e}") from None
    r, s, t = params.recipe(recipe_name), scale or params.scale, params.train
    if seed is not None:
        t = dataclasses.replace(t, seed=seed)
    if t.zero_stage and r.opt not in ZERO_SAFE_OPTIMIZERS:
        raise ConfigError(
            f"train.zero_stage = {t.zero_stage} with recipes.{recipe_name}.opt = {r.opt!r}: ZeRO "
            f"partitions flattened parameters, so {r.opt}'s per-tensor update (LAMB's trust ratio) would "
            "be computed over shards and change the recipe's math; use train.zero_stage: 0 "
            f"(ZeRO keeps the math of: {', '.join(ZERO_SAFE_OPTIMIZERS)})"
        )
    world = world_size or t.devices * t.nodes
    epochs = max(s.min_epochs, round(r.epochs * s.epochs))
    lr = (
        s.lr_factor
        * r.lr
        * {"sqrt": math.sqrt(s.batch_size / r.batch_size), "linear": s.batch_size / r.batch_size, "none": 1.0}[
            s.lr_rule
        ]
    )
    if s.batch_size % (t.micro_batch * world):
        raise ConfigError(
            f"scale.batch_size={s.batch_size} is not micro_batch x devices x accumulation: train.micro_batch="
            f"{t.micro_batch} x {world} processes does not divide it; change train.micro_batch or train.devices"
        )
    if t.micro_batch % 2 and (r.mixup or r.cutmix):
        raise ConfigError(f"train.micro_batch={t.micro_batch}: Mixup/CutMix need an even batch per device")
    from rsb.hardware import auto_precision, use_cuda

    cuda = use_cuda()
    if t.prefetcher == "auto":
        t = dataclasses.replace(t, prefetcher=cuda)
    if t.workers == "auto":  # one GPU's loader needs the cores that feed it; on the CPU the cores train
        t = dataclasses.replace(t, workers=max(1, (os.cpu_count() or 1) // t.devices) if cuda else 1)
    if not r.amp:  # the recipe trains in fp32 whatever the machine offers
        t = dataclasses.replace(t, precision="fp32")
    elif t.precision == "auto":
        t = dataclasses.replace(t, precision=auto_precision())
    return Resolved(
        arch=arch,
        recipe_name=recipe_name,
        recipe=r,
        epochs=epochs,
        warmup_epochs=r.warmup_epochs * epochs / r.epochs,
        img_size=scaled_size(r.img_size, s),
        test_img_size=scaled_size(r.test_img_size, s),
        batch_size=s.batch_size,
        lr=lr,
        grad_accum=s.batch_size // (t.micro_batch * world),
        world_size=world,
        train=t,
        scale=s,
    )


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


README_BLOCK = re.compile(r"(<!-- params domains: [^\n]*-->\n).*?(\n<!-- /params domains -->)", re.S)


def render_readme(path: Path) -> None:
    """Rewrite the README's table of params domains from the declarations."""
    text = Path(path).read_text()
    Path(path).write_text(README_BLOCK.sub(lambda m: m.group(1) + domains_markdown() + m.group(2), text))


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Print the table of params.yaml domains, or render it into a README.")
    p.add_argument("--readme", type=Path, help="rewrite this file's params-domains block")
    a = p.parse_args()
    render_readme(a.readme) if a.readme else print(domains_markdown())
