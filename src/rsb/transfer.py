"""Fine-tuning starts: a weights file checked against the architecture and stored as the start the fine-tune loads.

A start is every tensor of a timm architecture except its classifier (the downstream head is new). Sources:
- a grid model (`models/<arch>-<recipe>.safetensors`), or any safetensors file;
- a torch file loaded with `weights_only=True` (torchvision's `resnet50-0676ba61.pth`, a DDP checkpoint with
  `module.` prefixes, a `{"state_dict": ...}` or `{"model": ...}` checkpoint); never unpickled with a full unpickler;
- `scratch`: timm's initialization of the architecture, seeded.
Every tensor the architecture has (classifier aside) must be there with its shape, or the import fails naming the
first one that is missing, unexpected or of another shape — before any fine-tuning starts. The fine-tune then loads
the start as timm's train.py does with `--pretrained --pretrained-path <start>` (rsb.training.create_model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from rsb.config import SCRATCH, ConfigError, Params, check_timm
from rsb.errors import RsbError
from rsb.io import check_finite, refuse_overlap, sha256
from rsb.outputs import STARTS

# Tensors timm's own loader adapts to the model (a ViT's position embedding, resampled to its patch grid by the
# model's checkpoint filter, as when train.py fine-tunes 224 px weights at 384 px): any grid size is a valid start.
RESAMPLED = frozenset({"pos_embed"})


class StartError(RsbError, ValueError):
    """A weights file that cannot start a fine-tune of the architecture."""


def classifier_keys(arch: str) -> set[str]:
    """The classifier's tensors, by timm's pretrained config (`fc` for ResNets, `head` for ViTs)."""
    cfg = timm.models.get_pretrained_cfg(arch)
    classifier = (cfg.classifier if cfg is not None else None) or "fc"
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


def reference_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of the architecture as timm builds it (on the meta device: no memory), classifier excluded."""
    with torch.device("meta"):
        model = timm.create_model(arch)
    skip = classifier_keys(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or weights-only torch file, unwrapped from the usual checkpoint forms."""
    path = Path(path)
    if not path.is_file():
        raise StartError(f"{path}: no such weights file; train it (`dvc repro`) or fix its path under transfer.weights")
    state: Any  # a state dict, a checkpoint holding one, or anything else a file may hold (checked below)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged, foreign or code-carrying file: one clear line
        raise StartError(
            f"{path}: not a weights file this can read ({type(e).__name__}: {str(e)[:160]}); give a "
            "safetensors file or a torch state dict saved with torch.save (loaded weights_only)"
        ) from None
    for key in ("state_dict", "model"):  # {"state_dict": ...} / {"model": ...} checkpoints
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StartError(f"{path}: holds no state dict (a mapping of names to tensors)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    check_finite(state, path)
    return state


def check_start(state: dict[str, torch.Tensor], arch: str, source: Path) -> dict[str, torch.Tensor]:
    """The state dict without its classifier, if every other tensor is the architecture's, with its shape."""
    expected, skip = reference_shapes(arch), classifier_keys(arch)
    body = {k: v for k, v in state.items() if k not in skip}
    missing = [k for k in expected if k not in body]
    unexpected = [k for k in body if k not in expected]
    if missing or unexpected:
        what = f"lacks {missing[0]!r}" if missing else f"has {unexpected[0]!r}, which {arch} does not"
        raise StartError(
            f"{source}: not {arch} weights: it {what} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected of {len(expected)} tensors); is it another architecture's file?"
        )
    for k, shape in expected.items():
        if tuple(body[k].shape) != shape and k not in RESAMPLED:
            raise StartError(
                f"{source}: {k} has shape {list(body[k].shape)}, {arch} needs {list(shape)}; is it "
                "another architecture's (or width's) file?"
            )
    return body


def write_start(body: dict[str, torch.Tensor], dst: Path, meta: dict) -> dict:
    """`dst` (safetensors) and `dst`.json (where it came from); the weights go last, whole or not at all."""
    from rsb.io import atomic, save_weights, write_json

    with atomic(dst) as tmp:
        save_weights(tmp, body)
        meta = {**meta, "tensors": len(body), "sha256": sha256(tmp)}
        write_json(dst.with_suffix(".json"), meta)
    return meta


def import_start(source: Path, arch: str, dst: Path) -> dict:
    state = read_weights(source)
    body = check_start(state, arch, source)
    return write_start(body, dst, {"arch": arch, "source": str(source), "source_sha256": sha256(source)})


def scratch_start(arch: str, seed: int, dst: Path) -> dict:
    """timm's initialization of `arch` after torch.manual_seed(seed): fine-tuning from it is training from scratch."""
    torch.manual_seed(seed)
    state = timm.create_model(arch).state_dict()
    body = {k: v for k, v in state.items() if k not in classifier_keys(arch)}
    return write_start(body, dst, {"arch": arch, "source": f"timm initialization, seed {seed}", "source_sha256": None})


def make_start(params: Params, name: str) -> dict:
    """transfer-start@<name> / transfer-scratch: the start `name` (transfer.weights.<name>, or `scratch`) checked
    against transfer.arch and stored under STARTS; returns its metadata (source, sha256, tensors)."""
    check_timm(params)
    tr, dst = params.transfer, STARTS / f"{name}.safetensors"
    if name in tr.weights:
        refuse_overlap({"the start": dst}, {f"transfer.weights.{name}": Path(tr.weights[name])})
    if name == SCRATCH:
        meta = scratch_start(tr.arch, params.train.seed, dst)
    elif name in tr.weights:
        meta = import_start(Path(tr.weights[name]), tr.arch, dst)
    else:
        raise ConfigError(
            f"transfer.weights has no {name!r} ({', '.join(tr.weights) or 'empty'}); add `{name}: <weights file>` there"
        )
    return meta
