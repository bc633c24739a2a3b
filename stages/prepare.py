"""prepare: official archives (real ImageNet under data.raw, or the generated mini release) -> data/prepared/.

    data/prepared/train/<wnid>/*.JPEG     val/<wnid>/ILSVRC2012_val_XXXXXXXX.JPEG     v2/<class index>/*
    data/prepared/real.json               classes.json (index -> wnid, name)          info.json (counts, digest)

Every input is checked before anything is published: the archives exist, the devkit parses, real.json has one list
per val image, every image decodes. The output is built in a temporary sibling folder and renamed into place at the
end, so a failed run never leaves a data/prepared that looks complete.

Results card (2 cores AMD EPYC, 2026-11-27, mini default: 20 classes, 1,602 train / 500 val / 200 V2 images, <=80 px):
    python -m stages.mini    ->  ~10 s, 8.9 MB of archives
    python -m stages.prepare   ->  1.9 s, 2,302 images decoded and checked, 7.5 MB in data/prepared
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from rsb.config import ConfigError, check_timm, load_params
from rsb.data import archives
from rsb.data.archives import ArchiveError, OFFICIAL_COUNTS


class Writer:
    """Writes files under one split folder, hashing each for the data digest, with a progress bar."""

    def __init__(self, root: Path, split: str, bar: tqdm):
        self.root, self.split, self.bar, self.hashes, self.bytes = root / split, split, bar, {}, 0

    def __call__(self, rel: str, data: bytes) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.hashes[f"{self.split}/{rel}"] = hashlib.sha256(data).hexdigest()
        self.bytes += len(data)
        self.bar.update(1)


def _decode(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.convert("RGB").load()  # PNG-named-.JPEG and CMYK files decode here, as the datasets read them
        return None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the same problem for the user
        return f"{type(e).__name__}: {e}"


def check_images(root: Path, origin: dict[str, Path]) -> None:
    files = sorted(str(p) for split in origin for p in (root / split).rglob("*") if p.is_file())
    workers = max(1, min(8, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        for path, err in zip(files, pool.map(_decode, files, chunksize=64)):
            if err:
                rel = Path(path).relative_to(root)
                raise ArchiveError(f"{origin[rel.parts[0]]}: image {Path(*rel.parts[1:])} cannot be decoded ({err}); "
                                   "replace the archive with an intact copy")


def _remove_abandoned(out: Path) -> None:
    """Partial folders of a prepare that was killed (its pid is gone): at ImageNet scale each holds up to 150 GB."""
    for d in out.parent.glob(f".{out.name}.partial-*"):
        pid = d.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build(raw: Path, out: Path, source: str, verify_md5: bool) -> dict:
    """Check the release under `raw`, then extract it into a fresh folder that replaces `out` on success."""
    paths = archives.require(raw)
    if verify_md5:
        archives.verify_md5(paths)
    devkit = archives.load_devkit(paths["devkit"])
    n_classes = len(devkit.wnids)
    if source == "imagenet" and (n_classes, len(devkit.val_wnids)) != (OFFICIAL_COUNTS["classes"],
                                                                       OFFICIAL_COUNTS["val"]):
        raise ArchiveError(f"{paths['devkit']}: {n_classes} classes / {len(devkit.val_wnids)} val labels, expected "
                           "the official 1000 / 50000 (data.source: imagenet)")
    real = archives.load_real(paths["real"], len(devkit.val_wnids), n_classes)

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        with tqdm(desc=f"prepare {raw}", unit="img", disable=None, file=sys.stderr) as bar:
            w = {s: Writer(tmp, s, bar) for s in ("train", "val", "v2")}
            train = archives.extract_train(paths["train"], w["train"], set(devkit.wnids))
            n_val = archives.extract_val(paths["val"], w["val"], devkit)
            n_v2 = archives.extract_v2(paths["v2"], w["v2"], n_classes)
        if source == "imagenet" and n_v2 != OFFICIAL_COUNTS["v2"]:
            raise ArchiveError(f"{paths['v2']}: {n_v2} images, expected {OFFICIAL_COUNTS['v2']}")
        check_images(tmp, {"train": paths["train"], "val": paths["val"], "v2": paths["v2"]})
        hashes = {k: v for writer in w.values() for k, v in writer.hashes.items()}
        info = {"source": source, "classes": n_classes, "images": {"train": sum(train.values()), "val": n_val,
                "v2": n_v2}, "bytes": {s: writer.bytes for s, writer in w.items()},
                "real_scored": sum(1 for r in real if r),
                "digest": hashlib.sha256("".join(f"{k}\t{hashes[k]}\n" for k in sorted(hashes)).encode()).hexdigest()}
        (tmp / "real.json").write_text(json.dumps(real))
        classes = [{"index": i, "wnid": wn, "name": devkit.names[wn][0], "words": list(devkit.names[wn])}
                   for i, wn in enumerate(devkit.wnids)]
        (tmp / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
        (tmp / "info.json").write_text(json.dumps(info, indent=2) + "\n")  # written last: the mark of completion
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--source", choices=["mini", "imagenet"], help="override data.source")
    p.add_argument("--raw", type=Path, help="folder of archives (override data.raw)")
    p.add_argument("--out", type=Path, help="prepared folder (override data.prepared)")
    args = p.parse_args(argv)
    params = load_params(args.params)
    check_timm(params, args.params)  # a recipe typo fails now, not after hours of preparing ImageNet
    data = params.data
    source, raw, out = args.source or data.source, args.raw or Path(data.raw), args.out or Path(data.prepared)
    info = build(raw, out, source, data.verify_md5 and source == "imagenet")
    print(f"prepared {out}: {info['classes']} classes, {info['images']}")
    return info


if __name__ == "__main__":
    try:
        main()
    except (ArchiveError, ConfigError) as e:
        sys.exit(f"error: {e}")
