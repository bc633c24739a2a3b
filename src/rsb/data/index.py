"""The index over the official archives: their names and formats, writing the index (prepare) and reading it back
(the datasets), and the fingerprint that tells whether an archive changed since.

    data/prepared/{train,val,v2}.npz   per image: source file, byte offset, size, class index (read in place)
    data/prepared/{split}.names.json.gz  names in the official layout (<wnid>/<file>, <class index>/<file>)
    data/prepared/v2.tar               ImageNetV2's .tar.gz repacked once, uncompressed, so it is read in place too
    data/prepared/real.json  classes.json (index -> wnid, name)  info.json (counts, sources + fingerprints, digest)

Class index = position of the wnid in sorted wnid order (classes.json), the convention every pretrained model uses.
info.json is written last: an index without it is not complete.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from rsb.errors import RsbError
from rsb.io import read_json

# The official release, as a user downloads it (the mini generator writes the same names and formats).
DEVKIT = "ILSVRC2012_devkit_t12"
V2_TOP = "imagenetv2-matched-frequency-format-val"
ARCHIVES = {
    "train": "ILSVRC2012_img_train.tar",
    "val": "ILSVRC2012_img_val.tar",
    "devkit": "ILSVRC2012_devkit_t12.tar.gz",
    "v2": "imagenetv2-matched-frequency.tar.gz",
    "real": "real.json",
}
V2_TOP = "imagenetv2-matched-frequency-format-val"  # the V2 archive's top folder
OFFICIAL_COUNTS = {"classes": 1000, "val": 50000, "v2": 10000}
SPLITS = ("train", "val", "v2")
FINGERPRINT = 1 << 16  # bytes hashed at each end of a source archive


class PreparedError(RsbError, RuntimeError):
    """data/prepared is missing or incomplete, or a source it indexes changed after preparation."""


def load_classes(root: Path) -> list[dict]:
    path = Path(root) / "classes.json"
    if not (Path(root) / "info.json").is_file() or not path.is_file():
        raise PreparedError(
            f"{root}: not a complete prepared dataset (no info.json/classes.json); run `dvc repro prepare` first"
        )
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
        self.paths = paths
        self.fds: dict[int, int] = {}
        self.pid: int | None = None

    def read(self, file: int, offset: int, size: int) -> bytes:
        if self.pid != os.getpid():
            self.fds, self.pid = {}, os.getpid()
        fd = self.fds.get(file)
        try:
            if fd is None:
                fd = self.fds[file] = os.open(self.paths[file], os.O_RDONLY)
            data = os.pread(fd, size, offset)
        except OSError as e:
            raise PreparedError(
                f"{self.paths[file]}: cannot be read ({e.strerror or type(e).__name__}); restore it, "
                "or run `dvc repro prepare` on what is there now"
            ) from None
        if len(data) != size:
            raise PreparedError(
                f"{self.paths[file]}: {len(data)} bytes at offset {offset}, the index says {size}; "
                "the source changed after preparation. Run `dvc repro prepare`"
            )
        return data

    def __getstate__(self):  # descriptors do not cross process boundaries
        return {"paths": self.paths, "fds": {}, "pid": None}


def write(tmp: Path, source: str, splits: dict, real: list, wnids: list[str], words: dict, hashes: dict) -> dict:
    """The index of `splits` ({split: (sources, entries (name, source, offset, size) sorted by name, labels)}) into
    `tmp`: arrays, names, ReaL, classes (`wnids` sorted, `words[wnid]` the devkit's words); info.json last, the mark
    of completion, with the data digest over every image's sha256 (`hashes`, {split/name: sha256}). Returns info."""
    for split, (_, entries, labels) in splits.items():
        np.savez(
            tmp / f"{split}.npz",
            source=np.array([e[1] for e in entries], np.int32),
            offset=np.array([e[2] for e in entries], np.int64),
            size=np.array([e[3] for e in entries], np.int64),
            label=np.array(labels, np.int32),
        )
        with gzip.GzipFile(tmp / f"{split}.names.json.gz", "wb", mtime=0) as f:
            f.write(json.dumps([e[0] for e in entries]).encode())
    info = {
        "source": source,
        "classes": len(wnids),
        "images": {s: len(e) for s, (_, e, _) in splits.items()},
        "bytes": {s: int(sum(e[3] for e in splits[s][1])) for s in SPLITS},
        "sources": {s: splits[s][0] for s in SPLITS},
        "real_scored": sum(1 for r in real if r),
        "digest": hashlib.sha256("".join(f"{k}\t{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest(),
    }
    (tmp / "real.json").write_text(json.dumps(real))
    classes = [{"index": i, "wnid": wn, "name": words[wn][0], "words": list(words[wn])} for i, wn in enumerate(wnids)]
    (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load(root: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One split's arrays (source file, offset, size, label) and its sources, as prepare wrote them."""
    info = read_json(Path(root) / "info.json")
    try:
        index = np.load(Path(root) / f"{split}.npz")
        arrays = tuple(index[k] for k in ("source", "offset", "size", "label"))
        return (*arrays, info["sources"][split])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise PreparedError(
            f"{root}: the {split} index is damaged ({type(e).__name__}: {str(e)[:100]}); "
            "rebuild it with `dvc repro prepare` (or `dvc checkout data/prepared`)"
        ) from None


def names(root: Path, split: str) -> list[str]:
    path = Path(root) / f"{split}.names.json.gz"
    try:
        with gzip.open(path, "rt") as f:
            return json.load(f)
    except (OSError, ValueError, EOFError) as e:
        raise PreparedError(
            f"{path}: unreadable ({type(e).__name__}); rebuild the index with `dvc repro "
            "prepare` (or `dvc checkout data/prepared`)"
        ) from None


def check_unchanged(sources: list[dict], paths: list[Path]) -> None:
    """The sources are what prepare indexed: one stat and 128 KiB per archive (not a walk of 1.3 M files);
    a folder source's files are checked for size as they are read."""
    for s, path in zip(sources, paths):
        if "ends_sha256" not in s:
            continue
        if not path.is_file() or fingerprint(path) != {k: s[k] for k in ("size", "ends_sha256")}:
            raise PreparedError(
                f"{path}: changed since `prepare` indexed it (size or content differs) or is "
                "missing; rebuild the index with `dvc repro prepare` (or restore the archive)"
            )
