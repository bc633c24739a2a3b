"""Datasets over data/prepared's index: train / val / v2 yield (RGB image, ILSVRC2012 class index); val has ReaL.

Images are read in place: each index entry is (source file, byte offset, size, class index) into the official
archives (or, for `data.source: folder`, one file per image), read with `os.pread` on a file each process opens once.
Nothing is extracted, so data/prepared stays small for DVC. Class index = position of the wnid in sorted wnid order
(classes.json), the convention every pretrained model uses. Images are decoded with PIL and converted to RGB:
ImageNet has a PNG named .JPEG and CMYK JPEGs.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from rsb.errors import RsbError
from rsb.io import read_json

SPLITS = ("train", "val", "v2")
FINGERPRINT = 1 << 16  # bytes hashed at each end of a source archive


class PreparedError(RsbError, RuntimeError):
    """data/prepared is missing or incomplete, or a source it indexes changed after preparation."""


def load_classes(root: Path) -> list[dict]:
    path = Path(root) / "classes.json"
    if not (Path(root) / "info.json").is_file() or not path.is_file():
        raise PreparedError(f"{root}: not a complete prepared dataset (no info.json/classes.json); "
                            "run `dvc repro prepare` first")
    return read_json(path)


def fingerprint(path: Path) -> dict:
    """Size and the hash of both ends: cheap (128 KiB read) at any size, and unchanged by `dvc checkout` (which
    changes mtimes). Same-size edits in the middle are DVC's to catch (`dvc status` hashes data.raw)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT))
        f.seek(max(0, size - FINGERPRINT))
        h.update(f.read(FINGERPRINT))
    return {"size": size, "ends_sha256": h.hexdigest()}


def source_path(root: Path, source: dict) -> Path:
    """A source file named in info.json: relative to data/prepared (the repacked V2 tar) or as prepare saw it."""
    return Path(root) / source["path"] if source["base"] == "prepared" else Path(source["path"])


class Reader:
    """pread-based access to the index's source files; file handles are opened once per process (and reopened in
    a forked DataLoader worker, which must not share the parent's offsets or descriptors)."""

    def __init__(self, paths: list[Path]):
        self.paths, self.fds, self.pid = paths, {}, None

    def read(self, file: int, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.get(file)
        try:
            if fd is None:
                fd = self.fds[file] = os.open(self.paths[file], os.O_RDONLY)
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise PreparedError(f"{self.paths[file]}: cannot be read ({e.strerror or type(e).__name__}); restore it, "
                                "or run `dvc repro prepare` on what is there now") from None
        if len(data) != size:
            raise PreparedError(f"{self.paths[file]}: {len(data)} bytes at offset {offset}, the index says {size}; "
                                "the source changed after preparation. Run `dvc repro prepare`")
        return data

    def __getstate__(self):  # descriptors do not cross process boundaries
        return {"paths": self.paths, "fds": {}, "pid": None}


class Split(Dataset):
    """One split of the index, in a fixed order (sorted by name). `samples` are (name, label) with names as in the
    official layout (`<wnid>/<file>` for train and val, `<class index>/<file>` for V2)."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split, self.transform = Path(root), split, transform
        self.num_classes = len(load_classes(self.root))
        info = read_json(self.root / "info.json")
        try:
            index = np.load(self.root / f"{split}.npz")
            self.file, self.offset, self.size, self.labels = (index[k] for k in ("source", "offset", "size", "label"))
            sources = info["sources"][split]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise PreparedError(f"{self.root}: the {split} index is damaged ({type(e).__name__}: {str(e)[:100]}); "
                                "rebuild it with `dvc repro prepare` (or `dvc checkout data/prepared`)") from None
        self.reader = Reader([source_path(self.root, s) for s in sources])
        self._names: list[str] | None = None
        self._check_unchanged(sources)

    def _check_unchanged(self, sources: list[dict]) -> None:
        """The sources are what prepare indexed: one stat and 128 KiB per archive (not a walk of 1.3 M files);
        a folder source's files are checked for size as they are read."""
        for s, path in zip(sources, self.reader.paths):
            if "ends_sha256" not in s:
                continue
            if not path.is_file() or fingerprint(path) != {k: s[k] for k in ("size", "ends_sha256")}:
                raise PreparedError(f"{path}: changed since `prepare` indexed it (size or content differs) or is "
                                    "missing; rebuild the index with `dvc repro prepare` (or restore the archive)")

    @property
    def samples(self) -> list[tuple[PurePosixPath, int]]:
        return [(PurePosixPath(n), int(y)) for n, y in zip(self.samples_names(), self.labels)]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> bytes:
        """The encoded image, byte for byte as in the source (an archive member by offset, or a folder's file)."""
        file, offset, size = int(self.file[i]), int(self.offset[i]), int(self.size[i])
        if offset >= 0:
            return self.reader.read(file, offset, size)
        path = self.reader.paths[file] / self.samples_names()[i]
        try:
            data = path.read_bytes()
        except OSError as e:
            raise PreparedError(f"{path}: cannot be read ({e.strerror or type(e).__name__}); the folder changed after "
                                "preparation: restore the file, or run `dvc repro prepare`") from None
        if len(data) != size:
            raise PreparedError(f"{path}: {len(data)} bytes, the index says {size}; the folder changed after "
                                "preparation. Run `dvc repro prepare`")
        return data

    def samples_names(self) -> list[str]:
        if self._names is None:
            path = self.root / f"{self.split}.names.json.gz"
            try:
                with gzip.open(path, "rt") as f:
                    self._names = json.load(f)
            except (OSError, ValueError, EOFError) as e:
                raise PreparedError(f"{path}: unreadable ({type(e).__name__}); rebuild the index with `dvc repro "
                                    "prepare` (or `dvc checkout data/prepared`)") from None
        return self._names

    def __getitem__(self, i: int):
        data = self.read(i)
        try:
            img = Image.open(io.BytesIO(data))
            img = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure: the file, named, from inside a loader worker
            where = self.reader.paths[int(self.file[i])]
            raise PreparedError(f"{where}: image {self.samples_names()[i]} cannot be decoded ({type(e).__name__}: "
                                f"{str(e)[:120]}); restore an intact copy and run `dvc repro prepare`") from None
        return (self.transform(img) if self.transform else img), int(self.labels[i])

    def real_labels(self) -> list[list[int]]:
        """ReaL's label list for each val sample, in this dataset's order (real.json is by val file number)."""
        if self.split != "val":
            raise ValueError("ReaL labels exist for the val split only")
        real = read_json(self.root / "real.json")
        return [real[int(p.stem.rsplit("_", 1)[1]) - 1] for p, _ in self.samples]
