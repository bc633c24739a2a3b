"""The prepared data at scale, old layout against new: one file per image (extracted) vs an index over the archives.

    python -m bench.index_scale [--per-class 5000] [--old-rev b1456cf] [--json out.json]   # ~15 min on 2 cores

Generates a mini release of 20 x per-class train images (100,000 by default; small JPEGs, so the counts dominate,
not the bytes), then for each layout: `prepare` (the old one from git revision --old-rev, run from a worktree),
DVC on the prepared folder in a scratch repo (`dvc add` = the hashing a stage's `dvc commit` does, `dvc status`,
`dvc push` to a local-folder remote), and one loader epoch (A1's train transforms at the mini's 32 px, 2 workers).
Prints one table and the linear extrapolation to ImageNet's 1,331,167 images (train + val + V2).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167 + 50_000 + 10_000  # train + val + V2


def timed(cmd: list[str], cwd: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def dvc_times(folder: Path, work: Path) -> dict:
    """`dvc add` (hashing + cache), `dvc status`, `dvc push` to a local remote, in a scratch git + DVC repo."""
    repo = work / f"repo-{folder.name}"
    repo.mkdir()
    shutil.move(str(folder), repo / "prepared")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "remote", "add", "-d", "r", str(work / f"remote-{folder.name}")],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    out = {
        "add_s": timed(["dvc", "add", "prepared"], repo),
        "status_s": timed(["dvc", "status"], repo),
        "push_s": timed(["dvc", "push"], repo),
    }
    shutil.move(str(repo / "prepared"), folder)  # back where the loader reads it
    return out


def loader_epoch(code: Path, prepared: Path) -> float:
    """img/s of one epoch of the project's train loader over a prepared folder, with the code at `code`."""
    script = f"""
import sys, time, dataclasses, inspect
sys.path[:0] = [{str(code / "src")!r}, {str(code)!r}]
import torch, timm
from rsb.config import load_params, resolve
from rsb import loader as loaders
from rsb.data.datasets import Split
r = resolve(load_params({str(code / "params.yaml")!r}), 'resnet18', 'a3', world_size=1)
r = dataclasses.replace(r, micro_batch=64, grad_accum=1, batch_size=64,
                        train=dataclasses.replace(r.train, workers=2))
model = timm.create_model('resnet18', num_classes=20)
two_args = loaders.train_transform.__code__.co_argcount == 2
tf = loaders.train_transform(r, model) if two_args else loaders.train_transform(r)
ds = Split({str(prepared)!r}, 'train', tf)
t0, seen = time.perf_counter(), 0
where = torch.device('cpu') if 'device' in inspect.signature(loaders.train_loader).parameters else False
for x, _ in loaders.train_loader(ds, r, 0, 0, where, *([loaders.normalization(model)] if where is not False else [])):
    seen += x.shape[0]
print(seen / (time.perf_counter() - t0))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def prepare(code: Path, raw: Path, out: Path) -> float:
    script = (
        f"import sys; sys.path[:0] = [{str(code / 'src')!r}, {str(code)!r}]\n"
        "try:\n    from rsb.data.prepare import build\n"
        "except ImportError:  # a revision before rsb.data.prepare (--old-rev)\n    from stages.prepare import build\n"
        "from pathlib import Path\n"
        f"build(Path({str(raw)!r}), Path({str(out)!r}), 'mini', False)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def size_and_files(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=5000)
    p.add_argument("--old-rev", default="b1456cf", help="a revision with the extracting prepare")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
    from rsb.data.mini import write_release
    from rsb.data.spec import MiniSpec

    work = Path(tempfile.mkdtemp(prefix="rsb-index-"))
    old_code = work / "old-code"
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(old_code), a.old_rev], cwd=ROOT, check=True)
    try:
        t0 = time.perf_counter()
        summary = write_release(
            work / "raw",
            MiniSpec(seed=0, classes=20, train_per_class=a.per_class, val_per_class=25, v2_per_class=10, image_size=48),
        )
        images = sum(summary["images"].values())
        print(f"release: {summary['images']} in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = {}
        for layout, code in (("old: extracted files", old_code), ("new: index", ROOT)):
            out = work / ("old" if code == old_code else "new")
            row = {"prepare_s": prepare(code, work / "raw", out)}
            row["files"], row["bytes"] = size_and_files(out)
            row["loader_img_s"] = loader_epoch(code, out)
            row.update(dvc_times(out, work))
            rows[layout] = row
            print(layout, json.dumps(row), flush=True)
        scale = IMAGENET / images
        print(f"\n{images:,} images; extrapolated linearly to ImageNet's {IMAGENET:,} (x{scale:.1f}):")
        print("| layout | files | MB | prepare s | dvc add s | dvc status s | dvc push s | loader img/s |")
        print("|---|---|---|---|---|---|---|---|")
        for layout, r in rows.items():
            print(
                f"| {layout} | {r['files']:,} | {r['bytes'] / 1e6:.1f} | {r['prepare_s']:.1f} | {r['add_s']:.1f} "
                f"| {r['status_s']:.1f} | {r['push_s']:.1f} | {r['loader_img_s']:.0f} |"
            )
        for layout, r in rows.items():
            files = r["files"] * scale if r["files"] > 100 else r["files"]  # the index is a fixed set of files
            print(
                f"| {layout}, x{scale:.1f} | {files:,.0f} | | {r['prepare_s'] * scale / 60:.0f} min | "
                f"{r['add_s'] * scale / 60:.1f} min | {r['status_s'] * scale / 60:.1f} min | "
                f"{r['push_s'] * scale / 60:.1f} min | |"
            )
        if a.json:
            a.json.write_text(json.dumps({"images": images, "rows": rows}, indent=1))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_code)], cwd=ROOT)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
