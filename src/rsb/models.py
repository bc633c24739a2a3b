"""The network: built as timm's train.py builds it (for training, from a start for fine-tuning), and rebuilt from a
weights file (evaluate, the registry's backfill) with the same architecture, kwargs and classes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch

from rsb.errors import InputError
from rsb.io import load_weights

if TYPE_CHECKING:
    from rsb.config import Resolved


def model_kwargs(arch: str, img_size: int) -> dict:
    """train.py's --model-kwargs for this size: models that fix their patch grid at creation (ViT, DeiT) are built
    for the training size (`img_size`), as DeiT's main.py builds them; models that take any size (ResNets) get
    nothing. At the paper's 224 px this is empty for both."""
    cfg = timm.models.get_pretrained_cfg(arch)
    if cfg is not None and tuple(cfg.input_size[-2:]) == (img_size, img_size):
        return {}
    with torch.device("meta"):  # does the constructor take img_size? (no weights allocated)
        try:
            timm.create_model(arch, img_size=img_size)
        except TypeError:
            return {}
    return {"img_size": img_size}


def create_model(r: Resolved, num_classes: int, start: Path | None = None) -> torch.nn.Module:
    """`start` (fine-tuning): timm train.py's `--pretrained --pretrained-path <start>`, i.e. timm's own loader with
    `num_classes=-1` in the overlay, which forces the head adaptation: every tensor but the classifier comes from the
    file, the classifier keeps its fresh initialization for `num_classes` (rsb.transfer checked the file first)."""
    pretrained: dict[str, Any] = (
        {} if start is None else {"pretrained": True, "pretrained_cfg_overlay": dict(file=str(start), num_classes=-1)}
    )
    return timm.create_model(
        r.arch,
        num_classes=num_classes,
        drop_path_rate=r.recipe.drop_path,
        **model_kwargs(r.arch, r.img_size),
        **pretrained,
    )


def load_model(
    arch: str, weights: Path, num_classes: int, stage: str | None = None, img_size: int | None = None
) -> torch.nn.Module:
    """The trained network, built as training built it (`img_size`: the training size, for models that fix their
    patch grid at creation)."""
    if not weights.is_file():
        raise InputError(f"{weights}: no trained weights; run `dvc repro {stage or 'train@' + weights.stem}` first")
    model = timm.create_model(arch, num_classes=num_classes, **(model_kwargs(arch, img_size) if img_size else {}))
    state = load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:160]
        raise InputError(
            f"{weights}: not {arch} weights for {num_classes} classes ({first.strip()}); rerun "
            f"`dvc repro {stage or 'train@' + weights.stem}`"
        ) from None
    return model
