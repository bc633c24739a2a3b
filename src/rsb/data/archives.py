"""Reading the official ILSVRC2012, ImageNetV2 and ReaL files in place: members indexed by offset, never extracted.

The devkit is read the way torchvision's `datasets.imagenet` reads it (scipy `loadmat(..., squeeze_me=True)`, leaf
synsets are those with num_children == 0, ground truth in 1-based ILSVRC2012_IDs); torchvision's own functions are
locked to the official md5 sums and extract without path checks, so the same structures are read here, and the
published sums are kept as an optional integrity check. Tar metadata (links, modes, owners, devices) never reaches
the disk, and any member that is not a plain file or directory with a safe relative name is refused.

Just over ~300 lines: one reader per official format (train tar of tars, flat val tar, devkit .mat, V2 .tar.gz,
ReaL json, an extracted folder), each with its member checks against the devkit.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rsb.data.index import ARCHIVES, DEVKIT
from rsb.errors import RsbError

# torchvision.datasets.imagenet.ARCHIVE_META (the official release's md5 sums).
OFFICIAL_MD5 = {
    "ILSVRC2012_img_train.tar": "1d675b47d978889d74fa0da5fadfb00e",
    "ILSVRC2012_img_val.tar": "29b22e2961454d5413ddabcf34fc5622",
    "ILSVRC2012_devkit_t12.tar.gz": "fa75699e90414af021442c21a62c3abf",
}
WNID = re.compile(r"n\d{8}")


class ArchiveError(RsbError, RuntimeError):
    """A bad input file: the message names the file and what was expected."""


@dataclass(frozen=True)
class Devkit:
    wnids: list[str]  # sorted: index = class index (the ILSVRC2012 convention)
    names: dict[str, tuple[str, ...]]
    val_wnids: list[str]  # wnid of ILSVRC2012_val_{i+1:08d}.JPEG


def require(raw: Path) -> dict[str, Path]:
    """The five release files under `raw`, or one error that lists what is missing."""
    paths = {k: raw / name for k, name in ARCHIVES.items()}
    missing = [p.name for p in paths.values() if not p.is_file()]
    if missing:
        raise ArchiveError(
            f"{raw}: missing {', '.join(missing)}. Put the official archives there (data.raw in "
            "params.yaml), or use data.source: mini to generate the miniature release"
        )
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
            raise ArchiveError(
                f"{p}: md5 {got} != published {OFFICIAL_MD5[p.name]}; the download is damaged or "
                "not the official release (set data.verify_md5: false to skip this check)"
            )


def safe_name(archive: Path | str, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's relative path, or an error if it is not a plain file that stays inside the target."""
    if not (member.isfile() or member.isdir()):
        kind = (
            "symlink"
            if member.issym()
            else "hardlink"
            if member.islnk()
            else "device file"
            if member.isdev()
            else "special file"
        )
        raise ArchiveError(
            f"{archive}: member {member.name!r} is a {kind}; refusing to extract it "
            "(archives must contain plain files only)"
        )
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts or "\\" in member.name:
        raise ArchiveError(
            f"{archive}: member {member.name!r} would be written outside the target folder; refusing to extract it"
        )
    return path


def iter_files(tar: tarfile.TarFile, archive: Path | str) -> Iterator[tuple[PurePosixPath, bytes]]:
    """(relative path, content) of each plain file, in archive order; streams (mode 'r|') work too."""
    try:
        for member in tar:
            path = safe_name(archive, member)
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None  # a regular file's member always has one
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
    return Devkit(
        wnids=sorted(idx_to_wnid.values()), names=wnid_to_classes, val_wnids=[idx_to_wnid[i] for i in ground_truth]
    )


def load_real(path: Path, n_val: int, n_classes: int) -> list[list[int]]:
    try:
        real = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArchiveError(f"{path}: not readable JSON ({e}); expected ReaL's real.json") from None
    if not isinstance(real, list) or len(real) != n_val:
        got = len(real) if isinstance(real, list) else type(real).__name__
        raise ArchiveError(
            f"{path}: has {got} entries, expected one label list per val image ({n_val}); "
            "use the real.json that matches this val set"
        )
    for i, labels in enumerate(real):
        if not isinstance(labels, list) or not all(isinstance(y, int) and 0 <= y < n_classes for y in labels):
            raise ArchiveError(f"{path}: entry {i} is {labels!r}; expected a list of class indices in [0, {n_classes})")
    return real


Entry = tuple[str, int, int]  # (name in the official layout, byte offset of the member's data, size)


class _Window(io.RawIOBase):
    """A read-only view of bytes [start, start + size) of an open file: an inner tar read in place."""

    def __init__(self, f, start: int, size: int):
        self.f, self.start, self.size, self.pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = {0: pos, 1: self.pos + pos, 2: self.size + pos}[whence]
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def members(f, label: Path | str, size: int) -> list[Entry]:
    """Plain-file members of an uncompressed tar read through `f` by their headers only (random access: nothing
    is extracted), with safe names, each checked to lie inside the archive."""
    out = []
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                name = safe_name(label, m)
                if m.isfile():
                    if m.offset_data + m.size > size:
                        raise ArchiveError(f"{label}: member {m.name} is truncated; download the archive again")
                    out.append((str(name), m.offset_data, m.size))
    except tarfile.CompressionError as e:
        raise ArchiveError(
            f"{label}: compressed ({e}); it is read in place, so it must be the uncompressed tar of "
            "the official release"
        ) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise ArchiveError(f"{label}: truncated or corrupt archive ({e}); download it again") from None
    return out


def index_train(path: Path, wnids: set[str]) -> list[Entry]:
    """The outer train tar of per-class inner tars -> entries `<wnid>/<file>` at their offsets in the outer tar."""
    entries, seen = [], set()
    size = path.stat().st_size
    with open(path, "rb") as f:
        for inner, start, length in members(f, path, size):
            wnid = PurePosixPath(inner).name.removesuffix(".tar")
            if not inner.endswith(".tar") or wnid not in wnids:
                raise ArchiveError(
                    f"{path}: member {inner} is not <wnid>.tar for a devkit class; expected the "
                    "official ILSVRC2012_img_train.tar layout"
                )
            for name, offset, n in members(_Window(f, start, length), f"{path}:{inner}", length):
                entries.append((f"{wnid}/{PurePosixPath(name).name}", start + offset, n))
                seen.add(wnid)
    missing = sorted(wnids - seen)
    if missing:
        raise ArchiveError(f"{path}: no images for {len(missing)} devkit classes (first: {missing[0]})")
    return entries


VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.JPEG")


def val_wnid(path: Path | str, name: str, devkit: Devkit) -> str:
    m = VAL_NAME.fullmatch(PurePosixPath(name).name)
    if not m or not 1 <= int(m.group(1)) <= len(devkit.val_wnids):
        raise ArchiveError(
            f"{path}: member {name} has no ground truth in the devkit "
            f"(expected ILSVRC2012_val_00000001..{len(devkit.val_wnids):08d}.JPEG)"
        )
    return devkit.val_wnids[int(m.group(1)) - 1]


def index_val(path: Path, devkit: Devkit) -> list[Entry]:
    """The flat val tar -> entries `<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG`, labelled by the devkit's ground truth."""
    with open(path, "rb") as f:
        entries = [
            (f"{val_wnid(path, name, devkit)}/{PurePosixPath(name).name}", offset, n)
            for name, offset, n in members(f, path, path.stat().st_size)
        ]
    return entries  # each of the devkit's IDs exactly once: check_members


def repack_v2(path: Path, out: Path, n_classes: int) -> list[Entry]:
    """imagenetv2-matched-frequency (.tar.gz, <top>/<class index>/<file>) -> one uncompressed tar of
    `<class index>/<file>` members, so it is read in place like the others; returns entries into `out` (that every
    class has a folder is checked for both sources, archive and folder, by rsb.data.prepare.scan)."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in _files(path):
            folder = name.parent.name
            if len(name.parts) != 3 or not folder.isdigit() or not 0 <= int(folder) < n_classes:
                raise ArchiveError(f"{path}: member {name} is not <top>/<class index 0..{n_classes - 1}>/<image>")
            info = tarfile.TarInfo(f"{folder}/{name.name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(out, "rb") as f:
        return members(f, out, out.stat().st_size)


def require_folder(raw: Path) -> dict[str, Path]:
    """`data.source: folder`: an extracted ImageNet (train/<wnid>/*, val/<wnid>/* or flat val/, v2/<index>/*) plus
    the devkit and real.json, or one error that lists what is missing."""
    paths = {
        "train": raw / "train",
        "val": raw / "val",
        "v2": raw / "v2",
        "devkit": raw / ARCHIVES["devkit"],
        "real": raw / ARCHIVES["real"],
    }
    missing = [
        f"{p.name}/" if k in ("train", "val", "v2") else p.name
        for k, p in paths.items()
        if not (p.is_dir() if k in ("train", "val", "v2") else p.is_file())
    ]
    if missing:
        raise ArchiveError(
            f"{raw}: missing {', '.join(missing)}. data.source: folder expects train/<wnid>/*.JPEG, "
            "val/<wnid>/*.JPEG (or the flat val/ folder), v2/<class index>/*, the devkit and real.json"
        )
    return paths


def index_folder(base: Path, flat: bool = False) -> list[Entry]:
    """Every image under an extracted split folder -> (path relative to it, 0, size), read by the one ImageFolder
    reader (`rsb.data.folder.scan`, the downstream sets' too); `flat`: ImageNet's flat val folder is allowed."""
    from rsb.data.folder import scan

    return [(name, 0, size) for name, size in scan(base, flat, ArchiveError)]


def check_members(split: str, names: list[str], path: Path, devkit: Devkit) -> None:
    """Members against the devkit: no name twice (a repeated member, or two inner tars of one class); val holds
    each of the devkit's ILSVRC2012_val_* IDs exactly once, none missing, none extra, each under the wnid the
    devkit's ground truth gives it."""
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ArchiveError(
                f"{path}: member {n} appears more than once; the archive is not the official release "
                "(re-download it, or remove the repeat from the folder)"
            )
        seen.add(n)
    if split != "val":
        return
    ids: dict[int, str] = {}
    for n in names:
        p = PurePosixPath(n)
        m = VAL_NAME.fullmatch(p.name)
        if not m:
            raise ArchiveError(
                f"{path}: {n} is not ILSVRC2012_val_<8 digits>.JPEG; the devkit's ground truth labels "
                "val images by that number"
            )
        i = int(m.group(1))
        if i in ids:
            raise ArchiveError(f"{path}: val image {p.name} appears twice ({ids[i]}, {n}); keep one")
        ids[i] = n
        if not 1 <= i <= len(devkit.val_wnids):
            raise ArchiveError(
                f"{path}: {p.name} is not in the devkit's ground truth (ILSVRC2012_val_00000001.."
                f"{len(devkit.val_wnids):08d}); remove it"
            )
        if len(p.parts) > 1 and p.parts[0] != devkit.val_wnids[i - 1]:
            raise ArchiveError(
                f"{path}: {n} lies in {p.parts[0]}/, but the devkit's ground truth says "
                f"{devkit.val_wnids[i - 1]}; the val folder is mislabelled: rebuild it from the "
                "official val tar"
            )
    missing = sorted(set(range(1, len(devkit.val_wnids) + 1)) - set(ids))
    if missing:
        raise ArchiveError(
            f"{path}: {len(missing)} val image(s) of the devkit's ground truth missing (first: "
            f"ILSVRC2012_val_{missing[0]:08d}.JPEG); restore them from the official val tar"
        )
