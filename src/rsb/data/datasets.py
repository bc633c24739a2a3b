"""Datasets over data/prepared: train / val / v2 yield (image, ILSVRC2012 class index); val also has ReaL lists.

Class index = position of the wnid in sorted wnid order (classes.json), the convention every pretrained model uses.
Images are decoded with PIL and converted to RGB: ImageNet has a PNG named .JPEG and CMYK JPEGs.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from PIL import Image
from torch.utils.data import Dataset

SPLITS = ("train", "val", "v2")


class PreparedError(RuntimeError):
    """data/prepared is missing or incomplete."""


def load_classes(root: Path) -> list[dict]:
    path = Path(root) / "classes.json"
    if not (Path(root) / "info.json").is_file() or not path.is_file():
        raise PreparedError(f"{root}: not a complete prepared dataset (no info.json/classes.json); "
                            "run `dvc repro prepare` first")
    return json.loads(path.read_text())


class Split(Dataset):
    """One split of data/prepared as (path, label) samples, in a fixed order (sorted folders, sorted files)."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split, self.transform = Path(root), split, transform
        classes = load_classes(self.root)
        # train/val folders are wnids; V2 folders are class indices (the label of folder k is k).
        folder_label = ({str(c["index"]): c["index"] for c in classes} if split == "v2"
                        else {c["wnid"]: c["index"] for c in classes})
        self.samples: list[tuple[Path, int]] = []
        for folder in sorted((self.root / split).iterdir(), key=lambda p: p.name):
            if folder.name not in folder_label:
                raise PreparedError(f"{folder}: not a class of {self.root / 'classes.json'}; re-run prepare")
            self.samples += [(f, folder_label[folder.name]) for f in sorted(folder.iterdir())]
        self.num_classes = len(classes)
        self._check_unedited()

    def _check_unedited(self) -> None:
        """The split holds what prepare wrote (file count and bytes from info.json); content edits that keep both
        are DVC's to catch (`dvc status` hashes data/prepared)."""
        info = json.loads((self.root / "info.json").read_text())
        want = (info["images"][self.split], info.get("bytes", {}).get(self.split))
        have = (len(self.samples), sum(f.stat().st_size for f, _ in self.samples) if want[1] is not None else None)
        if have != want:
            raise PreparedError(f"{self.root / self.split}: {have[0]} files ({have[1]} bytes), but prepare wrote "
                                f"{want[0]} ({want[1]} bytes); the prepared folder was edited after preparation. "
                                "Restore it with `dvc checkout data/prepared` or rebuild it with `dvc repro prepare`")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
        return (self.transform(img) if self.transform else img), label

    def real_labels(self) -> list[list[int]]:
        """ReaL's label list for each val sample, in this dataset's order (real.json is by val file number)."""
        if self.split != "val":
            raise ValueError("ReaL labels exist for the val split only")
        real = json.loads((self.root / "real.json").read_text())
        return [real[int(p.stem.rsplit("_", 1)[1]) - 1] for p, _ in self.samples]
