"""The embedded default's downstream datasets for the transfer study: two small sets in the ImageFolder layout,

    <out>/patterns/train/<class>/<n>.JPEG    <out>/patterns/val/<class>/<n>.JPEG
    <out>/outlines/train/<class>/<n>.JPEG    <out>/outlines/val/<class>/<n>.JPEG

the layout a user's fine-grained set (Flowers, Cars, Pets, CIFAR as images, iNaturalist, ...) is dropped in as.

Their classes are new, none of them a mini ImageNet class, but drawn from the same visual vocabulary (the mini's
colour families, edges, outlines, backgrounds and clutter, `rsb.data.mini`), so what pretraining learned can transfer:

    patterns   a surface texture the mini never shows (diagonal stripes, dots, rings, fine stripes) x 3 colour families
    outlines   the object's outline (disc, square, triangle, cross), a nuisance in the mini, x 3 colour families;
               the surface texture is now the nuisance

Small on purpose (12 classes x 40 train / 20 val images): fine-tuning must lean on the pretrained features, as on
the paper's fine-grained sets, and a few minutes on 2 cores fine-tune every (pretraining, dataset) pair.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rsb.data import mini

# Hue centres of three of the mini's colour families (rsb.data.mini.HUES): red, green, purple.
FAMILIES = {"red": 0.0, "green": 0.4, "purple": 0.8}
DATASETS = {
    "patterns": [("texture", t) for t in ("diagonal", "dots", "rings", "fine")],
    "outlines": [("shape", s) for s in mini.SHAPES],
}
TRAIN_PER_CLASS, VAL_PER_CLASS = 40, 20


def classes(dataset: str) -> list[tuple[str, dict]]:
    """(class folder name, what draws it) in sorted folder-name order (the class index, as ImageFolder assigns it)."""
    out = []
    for kind, value in DATASETS[dataset]:
        for family, hue in FAMILIES.items():
            out.append((f"{value}-{family}", {kind: value, "hue": hue}))
    return sorted(out)


def image(rng: np.random.Generator, concept: dict, image_size: int):
    img = mini.background(rng, mini.TRAIN_STYLE, image_size)
    texture = concept.get("texture") or mini.TEXTURES[rng.integers(len(mini.TEXTURES))]
    mini.paint(img, rng, texture, concept["hue"], mini.TRAIN_STYLE, shape=concept.get("shape"))
    return mini.finish(img, mini.TRAIN_STYLE)


def write_downstream(
    out: Path,
    seed: int = 0,
    image_size: int = 80,
    train_per_class: int = TRAIN_PER_CLASS,
    val_per_class: int = VAL_PER_CLASS,
) -> dict:
    """Write both datasets under `out`, deterministically from `seed`; returns a summary (classes, image counts)."""
    summary = {}
    for d, dataset in enumerate(sorted(DATASETS)):
        rng = np.random.default_rng([seed, 7919, d])  # its own stream: independent of the mini release's draws
        for split, n in (("train", train_per_class), ("val", val_per_class)):
            for name, concept in classes(dataset):
                folder = out / dataset / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    (folder / f"{i:04d}.JPEG").write_bytes(mini.jpeg_bytes(image(rng, concept, image_size)))
        summary[dataset] = {
            "classes": len(classes(dataset)),
            "train": train_per_class * len(classes(dataset)),
            "val": val_per_class * len(classes(dataset)),
        }
    (out / "downstream.json").write_text(
        json.dumps({"seed": seed, "image_size": image_size, "datasets": summary}, indent=2)
    )
    return summary
