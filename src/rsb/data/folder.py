"""A downstream dataset in the ImageFolder layout, checked before any training starts:

    <root>/train/<class>/<image>    <root>/val/<class>/<image>

Class index = position of the folder name in sorted order (torchvision's ImageFolder, which reads the images here);
train and val must have the same class folders, each with at least one image, or the indices would not mean the
same class in both. Images are decoded with PIL and converted to RGB.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

SPLITS = ("train", "val")


class FolderError(ValueError):
    """A downstream dataset folder that is missing or not in the ImageFolder layout."""


def _class_folders(root: Path, split: str) -> dict[str, int]:
    """Class folder -> number of images, for one split."""
    top = root / split
    if not top.is_dir():
        raise FolderError(f"{top}: no such folder; a downstream dataset is <root>/train/<class>/<image> and "
                          "<root>/val/<class>/<image> (ImageFolder layout)")
    counts = {d.name: sum(1 for f in d.rglob("*") if f.is_file() and f.suffix.lower() in IMG_EXTENSIONS)
              for d in sorted(top.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    if len(counts) < 2:
        raise FolderError(f"{top}: {len(counts)} class folder(s); a classification set needs at least 2 "
                          "(<class>/<image> under it)")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise FolderError(f"{top / empty[0]}: no images ({', '.join(IMG_EXTENSIONS)}); remove the folder or add "
                          "its images")
    return counts


def check(root: str | Path) -> dict:
    """The dataset's classes and image counts; one FolderError naming the folder and the fix otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"{root}: no such dataset folder; set transfer.root / transfer.datasets to folders in the "
                          "ImageFolder layout (or run the mini default's `dvc repro studies/dvc.yaml:transfer-data`)")
    train, val = (_class_folders(root, s) for s in SPLITS)
    if set(train) != set(val):
        only = sorted(set(train) ^ set(val))
        raise FolderError(f"{root}: train and val have different class folders (in one only: {', '.join(only[:5])})"
                          "; class indices come from the sorted folder names, so both need the same ones")
    return {"classes": sorted(train), "images": {"train": sum(train.values()), "val": sum(val.values())}}


def digest(root: str | Path) -> str:
    """The dataset's identity for resuming and MLflow: every file's path and size (a stat each, no reads, so cheap
    at iNaturalist's size; same-size edits are DVC's to catch, which hashes the folder as a stage dependency)."""
    h = hashlib.sha256()
    root = Path(root)
    for f in sorted(p for s in SPLITS for p in (root / s).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


class Folder(ImageFolder):
    """One split; yields (RGB image or its transform, class index) as train.py's ImageFolder datasets do."""

    def __init__(self, root: str | Path, split: str, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check(root)
        super().__init__(str(Path(root) / split), transform=transform)
        self.num_classes = len(self.classes)
