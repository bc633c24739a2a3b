"""Reading the official ILSVRC2012, ImageNetV2 and ReaL files, with safe extraction.

The devkit is read the way torchvision's `datasets.imagenet` reads it (scipy `loadmat(..., squeeze_me=True)`, leaf
synsets are those with num_children == 0, ground truth in 1-based ILSVRC2012_IDs); torchvision's own functions are
locked to the official md5 sums and extract without path checks, so the same structures are read here, and the
published sums are kept as an optional integrity check. Members are written byte for byte: tar metadata (links,
modes, owners, devices) never reaches the disk, and any member that is not a plain file inside its target is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from rsb.data.mini import ARCHIVES, DEVKIT

# torchvision.datasets.imagenet.ARCHIVE_META (the official release's md5 sums).
OFFICIAL_MD5 = {
    "ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
    "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
    "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf",
}
OFFICIAL_COUNTS = {"classes": 1000, "val": 50000, "v2": 10000}
WNID = re.compile(r"n\d{8}")


class ArchiveError(RuntimeError):
    """A bad input file: the message names the file and what was expected."""


@dataclass(frozen=True)
class Devkit:
    wnids: list[str]                 # sorted: index = class index (the ILSVRC2012 convention)
    names: dict[str, tuple[str, ...]]
    val_wnids: list[str]             # wnid of ILSVRC2012_val_{i+1:08d}.JPEG


def require(raw: Path) -> dict[str, Path]:
    """The five release files under `raw`, or one error that lists what is missing."""
    paths = {k: raw / name for k, name in ARCHIVES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise ArchiveError(f"{raw}: missing {', '.join(missing)}. Put the official archives there (data.raw in "
                           "params.yaml), or use data.source: mini to generate the miniature release")
    return paths


def md5sum(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_md5(paths: dict[str, Path]) -> None:
    for p in paths.values():
        if p.name in OFFICIAL_MD5 and (got := md5sum(p)) != OFFICIAL_MD5[p.name]:
            raise ArchiveError(f"{p}: md5 {got} != published {OFFICIAL_MD5[p.name]}; the download is damaged or "
                               "not the official release (set data.verify_md5: false to skip this check)")


def safe_name(archive: Path | str, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path, or an error if it is not a plain file that stays inside the target."""
    if not (member.isfile() or member.isdir()):
        kind = ("symlink" if member.issym() else "hardlink" if member.islnk() else
                "device file" if member.isdev() else "special file")
        raise ArchiveError(f"{archive}: member {member.name!r} is a {kind}; refusing to extract it "
                           "(archives must contain plain files only)")
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise ArchiveError(f"{archive}: member {member.name!r} would be written outside the target folder; "
                           "refusing to extract it")
    return path


def iter_files(tar: tarfile.TarFile, archive: Path | str) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, content) of each plain file, in archive order; streams (mode 'r|') work too."""
    try:
        for member in tar:
            path = safe_name(archive, member)
            if member.isfile():
                f = tar.extractfile(member)
                data = f.read()
                if len(data) != member.size:
                    raise ArchiveError(f"{archive}: member {member.name} is truncated")
                yield path, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"{archive}: truncated or corrupt archive ({e}); download it again") from None


def open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, mode="r|*")  # streaming: the train tar is 138 GB, read it once, in order
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise ArchiveError(f"{path}: not a readable tar archive ({e})") from None


def _files(path: Path) -> Iterator[tuple[PurePosixPath, bytes]]:
    with open_tar(path) as tar:
        yield from iter_files(tar, path)


def read_devkit(path: Path) -> tuple[dict[int, str], dict[str, tuple[str, ...]], list[int]]:
    """idx_to_wnid, wnid_to_classes and the val ground truth (1-based ILSVRC2012_IDs), as torchvision parses them."""
    import scipy.io as sio

    want = {f"{DEVKIT}/data/meta.mat", f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"}
    found = {str(name): data for name, data in _files(path) if str(name) in want}
    for name in sorted(want - set(found)):
        raise ArchiveError(f"{path}: has no {name}; expected the ILSVRC2012 devkit (ILSVRC2012_devkit_t12.tar.gz)")
    try:
        meta = sio.loadmat(io.BytesIO(found[f"{DEVKIT}/data/meta.mat"]), squeeze_me=True)["synsets"]
        nums_children = list(zip(*meta))[4]
        leaves = [meta[i] for i, n in enumerate(nums_children) if n == 0]
        idcs, wnids, classes = list(zip(*leaves))[:3]
    except Exception as e:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ArchiveError(f"{path}: data/meta.mat is not the devkit's synsets struct ({e})") from None
    idx_to_wnid = {int(i): str(w) for i, w in zip(idcs, wnids)}
    wnid_to_classes = {str(w): tuple(str(c).split(", ")) for w, c in zip(wnids, classes)}
    text = found[f"{DEVKIT}/data/ILSVRC2012_validation_ground_truth.txt"].decode().split()
    try:
        ground_truth = [int(x) for x in text]
    except ValueError:
        raise ArchiveError(f"{path}: ground truth has non-integer lines; expected one ILSVRC2012_ID per line") from None
    bad = sorted(set(ground_truth) - set(idx_to_wnid))
    if bad:
        raise ArchiveError(f"{path}: ground truth uses ILSVRC2012_ID {bad[0]}, which meta.mat has no leaf for")
    return idx_to_wnid, wnid_to_classes, ground_truth


def load_devkit(path: Path) -> Devkit:
    idx_to_wnid, wnid_to_classes, ground_truth = read_devkit(path)
    bad = [w for w in idx_to_wnid.values() if not WNID.fullmatch(w)]
    if bad:
        raise ArchiveError(f"{path}: meta.mat has leaf synset {bad[0]!r}, which is not a WordNet id (nXXXXXXXX)")
    return Devkit(wnids=sorted(idx_to_wnid.values()), names=wnid_to_classes,
                  val_wnids=[idx_to_wnid[i] for i in ground_truth])


def load_real(path: Path, n_val: int, n_classes: int) -> list[list[int]]:
    try:
        real = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArchiveError(f"{path}: not readable JSON ({e}); expected ReaL's real.json") from None
    if not isinstance(real, list) or len(real) != n_val:
        got = len(real) if isinstance(real, list) else type(real).__name__
        raise ArchiveError(f"{path}: has {got} entries, expected one label list per val image ({n_val}); "
                           "use the real.json that matches this val set")
    for i, labels in enumerate(real):
        if not isinstance(labels, list) or not all(isinstance(y, int) and 0 <= y < n_classes for y in labels):
            raise ArchiveError(f"{path}: entry {i} is {labels!r}; expected a list of class indices in "
                               f"[0, {n_classes})")
    return real


Write = Callable[[str, bytes], None]  # (path relative to the prepared split, content)


def extract_train(path: Path, write: Write, wnids: set[str]) -> dict[str, int]:
    """The outer train tar of per-class inner tars -> <wnid>/<file>; returns images per class."""
    counts: dict[str, int] = {}
    for inner_name, inner_data in _files(path):
        _extract_class(path, inner_name, inner_data, write, wnids, counts)
    missing = sorted(wnids - set(counts))
    if missing:
        raise ArchiveError(f"{path}: no images for {len(missing)} devkit classes (first: {missing[0]})")
    return counts


def _extract_class(path: Path, inner_name: PurePosixPath, inner_data: bytes, write: Write, wnids: set[str],
                   counts: dict[str, int]) -> None:
    wnid = inner_name.name.removesuffix(".tar")
    if inner_name.suffix != ".tar" or wnid not in wnids:
        raise ArchiveError(f"{path}: member {inner_name} is not <wnid>.tar for a devkit class; expected the "
                           "official ILSVRC2012_img_train.tar layout")
    label = f"{path}:{inner_name}"
    try:
        inner = tarfile.open(fileobj=io.BytesIO(inner_data), mode="r|*")
    except tarfile.TarError as e:
        raise ArchiveError(f"{label}: not a readable tar archive ({e})") from None
    with inner:
        for name, data in iter_files(inner, label):
            write(f"{wnid}/{name.name}", data)
            counts[wnid] = counts.get(wnid, 0) + 1


def extract_val(path: Path, write: Write, devkit: Devkit) -> int:
    """The flat val tar -> <wnid>/ILSVRC2012_val_XXXXXXXX.JPEG, labelled by the devkit's ground truth."""
    n = 0
    pattern = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")
    for name, data in _files(path):
        m = pattern.fullmatch(name.name)
        if not m or not 1 <= int(m.group(1)) <= len(devkit.val_wnids):
            raise ArchiveError(f"{path}: member {name} has no ground truth in the devkit "
                               f"(expected ILSVRC2012_val_00000001..{len(devkit.val_wnids):08d}.JPEG)")
        write(f"{devkit.val_wnids[int(m.group(1)) - 1]}/{name.name}", data)
        n += 1
    if n != len(devkit.val_wnids):
        raise ArchiveError(f"{path}: {n} images, but the devkit ground truth lists {len(devkit.val_wnids)}")
    return n


def extract_v2(path: Path, write: Write, n_classes: int) -> int:
    """imagenetv2-matched-frequency: <top>/<class index>/<file> -> <class index>/<file>."""
    n, seen = 0, set()
    for name, data in _files(path):
        folder = name.parent.name
        if len(name.parts) != 3 or not folder.isdigit() or not 0 <= int(folder) < n_classes:
            raise ArchiveError(f"{path}: member {name} is not <top>/<class index 0..{n_classes - 1}>/<image>")
        write(f"{folder}/{name.name}", data)
        seen.add(int(folder))
        n += 1
    missing = sorted(set(range(n_classes)) - seen)
    if missing:
        raise ArchiveError(f"{path}: class folders missing ({len(missing)}, first: {missing[0]}); ImageNetV2 "
                           f"matched-frequency has one folder per class 0..{n_classes - 1}")
    return n
