"""The ImageFolder layout, read by one module for every source: prepare's `data.source: folder` (an extracted
ImageNet) and the transfer study's downstream datasets refuse and skip exactly the same things.

    <split>/<class>/<image>      (class index = position of the folder name in sorted order, as torchvision's)

Rules (`scan`): entries whose name starts with "." are skipped everywhere (.DS_Store, ._* resource forks,
.ipynb_checkpoints); class folders are the other folders directly under the split; images are the files under a
class folder (nested folders walked in sorted order, links followed, as torchvision's `make_dataset`) with one of
torchvision's image extensions, in any case. Refused, naming the entry: any other file (a README, a .txt, an
archive), a class folder with no image, a file directly under the split (except the flat val folder of ImageNet),
a split with no image. A downstream dataset is <root>/train/<class>/<image> and <root>/val/<class>/<image>, with the
same class folders in both and at least 2 classes. Images are decoded with PIL and converted to RGB.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from rsb.errors import RsbError

SPLITS = ("train", "val")


class FolderError(RsbError, ValueError):
    """A folder that is missing or not in the ImageFolder layout."""


def _hidden(name: str) -> bool:
    return name.startswith(".")


def scan(top: Path, flat: bool = False, error: type[Exception] = FolderError) -> list[tuple[str, int]]:
    """(path relative to `top` in posix form, size) of every image of one split, in torchvision's order (see the
    module's rules); `flat`: images may also lie directly under `top` (ImageNet's flat val folder)."""
    top = Path(top)
    if not top.is_dir():
        raise error(f"{top}: no such folder; expected <class>/<image> under it (ImageFolder layout)")
    out: list[tuple[str, int]] = []
    with os.scandir(top) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    for e in entries:
        if e.is_dir():
            n, walked = len(out), []
            for dirpath, dirnames, filenames in os.walk(e.path, followlinks=True):
                dirnames[:] = [d for d in dirnames if not _hidden(d)]
                walked.append((dirpath, filenames))
            for dirpath, filenames in sorted(walked):  # torchvision's order: sorted by folder path, then by name
                for name in sorted(f for f in filenames if not _hidden(f)):
                    path = Path(dirpath) / name
                    _check_image(path, error)
                    out.append((path.relative_to(top).as_posix(), path.stat().st_size))
            if len(out) == n:
                raise error(
                    f"{Path(e.path)}: no images ({', '.join(IMG_EXTENSIONS)}) in this class folder; add its "
                    "images or remove the folder"
                )
        elif flat:
            _check_image(Path(e.path), error)
            out.append((e.name, Path(e.path).stat().st_size))
        else:
            raise error(
                f"{Path(e.path)}: a file directly under {top}; images go in class folders "
                "(<class>/<image>): move it into one, or out of the dataset"
            )
    if not out:
        raise error(f"{top}: no images; expected <class>/<image> under it (ImageFolder layout)")
    return out


def _check_image(path: Path, error: type[Exception]) -> None:
    if not path.name.lower().endswith(IMG_EXTENSIONS):
        raise error(
            f"{path}: not an image file ({', '.join(IMG_EXTENSIONS)}); move it out of the dataset folder "
            "(names starting with '.' are skipped)"
        )


def _class_folders(root: Path, split: str) -> dict[str, int]:
    """Class folder -> number of images, for one split of a downstream dataset."""
    top = root / split
    if not top.is_dir():
        raise FolderError(
            f"{top}: no such folder; a downstream dataset is <root>/train/<class>/<image> and "
            "<root>/val/<class>/<image> (ImageFolder layout)"
        )
    counts: dict[str, int] = {}
    for name, _ in scan(top):
        cls = name.split("/", 1)[0]
        counts[cls] = counts.get(cls, 0) + 1
    if len(counts) < 2:
        raise FolderError(
            f"{top}: {len(counts)} class folder(s); a classification set needs at least 2 (<class>/<image> under it)"
        )
    return counts


def check(root: str | Path) -> dict:
    """The dataset's classes and image counts; one FolderError naming the folder and the fix otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(
            f"{root}: no such dataset folder; set transfer.root / transfer.datasets to folders in the "
            "ImageFolder layout (or run the mini default's `dvc repro studies/dvc.yaml:transfer-data`)"
        )
    train, val = (_class_folders(root, s) for s in SPLITS)
    if set(train) != set(val):
        only = sorted(set(train) ^ set(val))
        raise FolderError(
            f"{root}: train and val have different class folders (in one only: {', '.join(only[:5])})"
            "; class indices come from the sorted folder names, so both need the same ones"
        )
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
    """One split; yields (RGB image or its transform, class index) as train.py's ImageFolder datasets do, over the
    images `scan` lists (so what is trained on is what was checked)."""

    def __init__(self, root: str | Path, split: str, transform=None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        check(root)
        super().__init__(str(Path(root) / split), transform=transform)
        self.num_classes = len(self.classes)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = sorted({name.split("/", 1)[0] for name, _ in scan(Path(directory))})
        return classes, {c: i for i, c in enumerate(classes)}

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        return [
            (os.path.join(directory, name), class_to_idx[name.split("/", 1)[0]]) for name, _ in scan(Path(directory))
        ]

    def __getitem__(self, index: int):
        path = self.samples[index][0]
        try:
            return super().__getitem__(index)
        except Exception as e:  # noqa: BLE001 - read or decode failure, raised in a loader worker: name the file
            raise FolderError(
                f"{path}: cannot be read as an image ({type(e).__name__}: {str(e)[:120]}); restore or remove it"
            ) from None
