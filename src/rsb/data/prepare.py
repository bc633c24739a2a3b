"""prepare: official archives (real ImageNet, the generated mini release, or an extracted folder) -> an index
(rsb.data.index: the files it writes, and how the datasets read them back).

No image is extracted: training and evaluation read the archives by offset (`rsb.data.datasets`), so data/prepared
is a few files for DVC to hash instead of 1.3 M. Every input is still checked before anything is published: the
archives exist and parse, the devkit parses, real.json has one list per val image, and every image is read, hashed
into the data digest and decoded (in parallel, with a progress bar). The output is built in a temporary sibling
folder and renamed into place at the end, so a failed run never leaves a data/prepared that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path, PurePosixPath

from PIL import Image
from tqdm import tqdm

from rsb import io as rio
from rsb import watchdog
from rsb.data import archives, index
from rsb.data.archives import ArchiveError
from rsb.data.index import OFFICIAL_COUNTS, SPLITS, Reader, source_path

CHUNK = 256  # images per task of the decode check
STAGE = "prepare"
LEGACY = ("info.json", "classes.json", "train.npz", "val.npz", "v2.npz")  # an index of a version before the marker


def _check(task: tuple[list[Path], list[tuple]]) -> list[tuple[str, str | None]]:
    """Read, hash and decode a chunk of index entries: (sha256, error or None) each."""
    paths, entries = task
    reader = Reader(paths)
    out: list[tuple[str, str | None]] = []
    for name, file, offset, size in entries:
        try:
            data = (paths[file] / name).read_bytes() if offset < 0 else reader.read(file, offset, size)
            with Image.open(io.BytesIO(data)) as img:
                img.convert("RGB").load()  # PNG-named-.JPEG and CMYK files decode here, as the datasets read them
            out.append((hashlib.sha256(data).hexdigest(), None))
        except Exception as e:  # noqa: BLE001 - any read or decoder failure is the same problem for the user
            out.append(("", f"{type(e).__name__}: {e}"))
    return out


def check_images(splits: dict, root: Path, bar: tqdm) -> dict[str, str]:
    """Every image of every split read, hashed and decoded in parallel; {split/name: sha256}."""
    tasks, where = [], []
    for split, (sources, entries, _) in splits.items():
        paths = [source_path(root, s) for s in sources]
        for i in range(0, len(entries), CHUNK):
            tasks.append((paths, entries[i : i + CHUNK]))
            where.append((split, sources))
    hashes = {}
    with ProcessPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for (paths, chunk), (split, sources), results in zip(tasks, where, pool.map(_check, tasks)):
            for (name, file, _, _), (digest, err) in zip(chunk, results):
                if err:
                    raise ArchiveError(
                        f"{paths[file]}: image {name} cannot be decoded ({err}); replace the "
                        f"{'file' if sources[file]['kind'] == 'folder' else 'archive'} with an intact copy"
                    )
                hashes[f"{split}/{name}"] = digest
            bar.update(len(chunk))
            watchdog.beat(len(hashes))
    return hashes


def _remove_abandoned(out: Path) -> None:
    """Partial folders of a prepare that was killed (its pid is gone; its marker inside): at ImageNet scale each
    holds up to 150 GB."""
    for d in out.parent.glob(f".{out.name}.partial-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)) and rio.owned(d, STAGE):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def scan(raw: Path, tmp: Path, source: str, paths: dict, devkit: archives.Devkit) -> dict:
    """{split: (sources, entries (name, source, offset, size) sorted by name, labels)}; offset -1: a folder's file."""
    index_of = {w: i for i, w in enumerate(devkit.wnids)}
    n_classes = len(devkit.wnids)
    found: dict[str, list[tuple[str, int, int, int]]]
    if source == "folder":
        found = {
            s: [(n, 0, -1, size) for n, _, size in archives.index_folder(paths[s], flat=s == "val")] for s in SPLITS
        }
        sources = {s: [{"path": str(paths[s]), "base": "raw", "kind": "folder"}] for s in SPLITS}
    else:
        members = {
            "train": archives.index_train(paths["train"], set(devkit.wnids)),
            "val": archives.index_val(paths["val"], devkit),
            "v2": archives.repack_v2(paths["v2"], tmp / "v2.tar", n_classes),
        }
        found = {s: [(n, 0, off, size) for n, off, size in e] for s, e in members.items()}
        where = {"train": (str(paths["train"]), "raw"), "val": (str(paths["val"]), "raw"), "v2": ("v2.tar", "prepared")}
        sources = {
            s: [{"path": p, "base": b, "kind": "tar", **index.fingerprint(tmp / p if b == "prepared" else Path(p))}]
            for s, (p, b) in where.items()
        }
    out = {}
    for split in SPLITS:
        archives.check_members(split, [e[0] for e in found[split]], paths[split], devkit)
        entries = sorted(found[split])
        labels = [label_of(split, PurePosixPath(e[0]), index_of, devkit, n_classes, paths[split]) for e in entries]
        out[split] = (sources[split], entries, labels)
    # the checks of what the splits hold, one list for both readers (the archives and an extracted folder)
    missing = sorted(set(devkit.wnids) - {devkit.wnids[y] for y in out["train"][2]})
    if missing:
        raise ArchiveError(f"{paths['train']}: no images for {len(missing)} devkit classes (first: {missing[0]})")
    absent = sorted(set(range(n_classes)) - set(out["v2"][2]))
    if absent:
        raise ArchiveError(
            f"{paths['v2']}: class folders missing ({len(absent)}, first: {absent[0]}); ImageNetV2 "
            f"matched-frequency has one folder per class 0..{n_classes - 1}"
        )
    return out


def label_of(split: str, name: PurePosixPath, index_of: dict, devkit, n_classes: int, where: Path) -> int:
    folder = name.parts[0] if len(name.parts) > 1 else None
    if split == "v2":
        if folder is None or not folder.isdigit() or not 0 <= int(folder) < n_classes:
            raise ArchiveError(f"{where}: {name} is not <class index 0..{n_classes - 1}>/<image>")
        return int(folder)
    if split == "val" and folder is None:  # the flat val folder: labels from the devkit's ground truth
        return index_of[archives.val_wnid(where, str(name), devkit)]
    if folder not in index_of:
        raise ArchiveError(f"{where}: {name} is not under a devkit class folder <wnid>/")
    return index_of[folder]


def build(raw: Path, out: Path, source: str, verify_md5: bool, key: str = "data.prepared") -> dict:
    """Check the release under `raw`, then index it into a fresh folder that replaces `out` on success. Before
    any work: `out` must not overlap `raw`, and an existing `out` must be an index this stage wrote."""
    rio.refuse_overlap({key: out}, {"data.raw": raw})
    rio.check_replaceable(out, STAGE, key, LEGACY)
    paths = archives.require_folder(raw) if source == "folder" else archives.require(raw)
    if verify_md5:
        archives.verify_md5(paths)
    devkit = archives.load_devkit(paths["devkit"])
    n_classes = len(devkit.wnids)
    if source == "imagenet" and (n_classes, len(devkit.val_wnids)) != (
        OFFICIAL_COUNTS["classes"],
        OFFICIAL_COUNTS["val"],
    ):
        raise ArchiveError(
            f"{paths['devkit']}: {n_classes} classes / {len(devkit.val_wnids)} val labels, expected "
            "the official 1000 / 50000 (data.source: imagenet)"
        )
    real = archives.load_real(paths["real"], len(devkit.val_wnids), n_classes)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    rio.mark(tmp, STAGE)
    try:
        splits = scan(raw, tmp, source, paths, devkit)
        counts = {s: len(entries) for s, (_, entries, _) in splits.items()}
        if source == "imagenet" and counts["v2"] != OFFICIAL_COUNTS["v2"]:
            raise ArchiveError(f"{paths['v2']}: {counts['v2']} images, expected {OFFICIAL_COUNTS['v2']}")
        if counts["val"] != len(devkit.val_wnids):
            raise ArchiveError(f"{paths['val']}: {counts['val']} images, but the devkit lists {len(devkit.val_wnids)}")
        with tqdm(total=sum(counts.values()), desc=f"prepare {raw}", unit="img", disable=None, file=sys.stderr) as bar:
            hashes = check_images(splits, tmp, bar)
        info = index.write(tmp, source, splits, real, devkit.wnids, devkit.names, hashes)
        rio.replace_folder(tmp, out, STAGE, key, LEGACY)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
