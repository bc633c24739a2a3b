"""Datasets over data/prepared's index: train / val / v2 yield (RGB image, ILSVRC2012 class index).

Images are read in place (the index: rsb.data.index): each index entry is (source file, byte offset, size, class
index) into the official archives (or, for `data.source: folder`, one file per image), read with `os.pread` on a file
each process opens once.
Nothing is extracted, so data/prepared stays small for DVC. Class index = position of the wnid in sorted wnid order
(classes.json), the convention every pretrained model uses. Images are decoded with PIL and converted to RGB:
ImageNet has a PNG named .JPEG and CMYK JPEGs.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from PIL import Image
from torch.utils.data import Dataset

from rsb.data import index
from rsb.data.index import SPLITS, PreparedError, Reader, load_classes, source_path


class Split(Dataset):
    """One split of the index, in a fixed order (sorted by name). `samples` are (name, label) with names as in the
    official layout (`<wnid>/<file>` for train and val, `<class index>/<file>` for V2)."""

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root, self.split, self.transform = Path(root), split, transform
        self.num_classes = len(load_classes(self.root))
        self.file, self.offset, self.size, self.labels, sources = index.load(self.root, split)
        self.reader = Reader([source_path(self.root, s) for s in sources])
        self._names: list[str] | None = None
        index.check_unchanged(sources, self.reader.paths)

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
            raise PreparedError(
                f"{path}: cannot be read ({e.strerror or type(e).__name__}); the folder changed after "
                "preparation: restore the file, or run `dvc repro prepare`"
            ) from None
        if len(data) != size:
            raise PreparedError(
                f"{path}: {len(data)} bytes, the index says {size}; the folder changed after "
                "preparation. Run `dvc repro prepare`"
            )
        return data

    def samples_names(self) -> list[str]:
        if self._names is None:
            self._names = index.names(self.root, self.split)
        return self._names

    def __getitem__(self, i: int):
        data = self.read(i)
        try:
            img = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception as e:  # noqa: BLE001 - any decoder failure: the file, named, from inside a loader worker
            where = self.reader.paths[int(self.file[i])]
            raise PreparedError(
                f"{where}: image {self.samples_names()[i]} cannot be decoded ({type(e).__name__}: "
                f"{str(e)[:120]}); restore an intact copy and run `dvc repro prepare`"
            ) from None
        return (self.transform(img) if self.transform else img), int(self.labels[i])
