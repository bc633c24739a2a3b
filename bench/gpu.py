"""The measurements of bench/gpu.sh, written to one folder (gpu.json + a line each on stdout).

    python -m bench.gpu --out DIR             # on a CUDA machine: resnet50, 224 px, bf16, channels_last
    python -m bench.gpu --out DIR --dry-run   # anywhere: test_resnet, 32 px, fp32, CPU (CI runs this)

1. the train stage's job (`rsb.trainer.train_recipe`: DeepSpeed, MLflow into a throwaway store, checkpoints) against
   a bare timm loop on the same batches (bench.train_vs_bare), at the largest micro-batch of [512, 384, 256, 192,
   128] whose forward + backward fits, timm's prefetcher on (as `auto` decides on a GPU; the dry run takes that path
   on the CPU too); img/s of both and the ratio; again with `train.compile: true` (second epoch, after compilation;
   not in the dry run: inductor's CPU compile alone takes minutes on 2 cores); MFU against the card's dense bf16 peak
   (6 x forward MACs per image);
2. the loader alone with one worker, A1's transforms on full-size JPEGs (~500 x 375, as ImageNet's): img/s per
   worker, and the workers the GPU's training rate needs;
3. the benchmark stage's batch-128 throughput and peak memory (`rsb.profiling.throughput`) against a plain
   `torch.inference_mode` loop on the same model and input.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml

from bench import scratch
from bench.train_vs_bare import ROOT, bare_epochs, ours, prepared_mini
from rsb import distributed, hardware, profiling
from rsb import loader as loaders
from rsb.config import load_params, override, resolve
from rsb.data.datasets import Split

# dense bf16 peak FLOP/s from the vendor's data sheets (SXM parts; the PCIe/NVL H100 is lower: the MFU then reads low)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
FULL = {
    "arch": "resnet50",
    "img": 224,
    "precision": "bf16",
    "candidates": [512, 384, 256, 192, 128],
    "mini": {"classes": 20, "train_per_class": 150, "val_per_class": 5, "v2_per_class": 2, "image_size": 500},
    "bench_batch": 128,
    "repeats": 10,
}
DRY = {
    "arch": "test_resnet",
    "img": 32,
    "precision": "fp32",
    "candidates": [16, 8],
    "mini": {"classes": 4, "train_per_class": 16, "val_per_class": 2, "v2_per_class": 1, "image_size": 64},
    "bench_batch": 8,
    "repeats": 2,
}


def largest_micro_batch(arch: str, img: int, candidates: list[int], device: torch.device, dtype) -> int:
    """The largest candidate whose training step (forward + backward at the stage's precision) fits in memory."""
    for batch in candidates:
        try:
            model = timm_model(arch).to(device).to(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x).float().sum().backward()
            return batch
        except torch.OutOfMemoryError:
            pass
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"none of {candidates} fits")


def timm_model(arch: str) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, num_classes=1000)


def loader_per_worker(r, prepared: Path, model) -> float:
    """img/s of one loader worker over the epoch's micro-batches (decode, A1 transforms, collate)."""
    ds = Split(prepared, "train", loaders.train_transform(r, model))
    one = r.__class__(**{**r.__dict__, "train": r.train.__class__(**{**r.train.__dict__, "workers": 1})})
    seen, t0 = 0, None
    loader = loaders.train_loader(ds, one, 0, 0, torch.device("cpu"), loaders.normalization(model))
    for i, (x, _) in enumerate(getattr(loader, "loader", loader)):  # the workers' side of a PrefetchLoader
        if i == 0:
            t0 = time.perf_counter()  # worker start-up is not a per-image cost
            continue
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def plain_inference(model, batch: int, img: int, device, dtype, repeats: int) -> float:
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def compiled_rate(arch: str, raw: dict, work: Path) -> float | str:
    """The train stage with `train.compile: true`: img/s of its second epoch (the first pays for compilation)."""
    raw = override(raw, {"train.compile": True, "scale.min_epochs": 2})
    params_file = work / "compiled.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        run = ours(arch, "a1", params_file, work)
    except Exception as e:  # noqa: BLE001 - a measurement that failed is reported, the others still are
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return float(run["train/img_per_s"])


def write(out: Path, result: dict) -> None:
    (out / "gpu.json").write_text(json.dumps(result, indent=1))
    (out / "gpu.md").write_text(markdown(result))


def markdown(r: dict) -> str:
    t, b, ld = r["train"], r["benchmark"], r["loader"]

    def num(v, fmt="{:.0f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else (v or "not measured")

    rows = [
        ("train stage img/s", num(t["ours_img_s"])),
        ("bare timm loop img/s", num(t["bare_img_s"])),
        ("stage / bare", num(t["ratio"], "{:.3f}")),
        ("MFU (bf16 peak)", num(t["mfu"], "{:.1%}")),
        ("train stage, compiled, img/s", num(t["compiled_img_s"])),
        ("MFU compiled", num(t["compiled_mfu"], "{:.1%}")),
        ("loader img/s per worker (A1, ~500x375 JPEG)", num(ld["img_s_per_worker"])),
        ("workers one GPU needs", num(ld["workers_needed"], "{:.1f}")),
        (f"benchmark stage img/s (batch {b['batch']})", num(b["stage_img_s"])),
        ("plain inference_mode img/s", num(b["plain_img_s"])),
        (f"peak memory MB ({b['peak_mem_kind']})", num(b["peak_mem_mb"])),
    ]
    head = (
        f"{r['device']}, {r['date']}, torch {r['torch']}: {r['arch']} {r['img']} px {r['precision']}, "
        f"micro-batch {r['micro_batch']}, prefetcher {r['prefetcher']}, {r['loader_workers']} workers"
        + (" (DRY RUN: sizes that check the script, not measurements)" if r["dry_run"] else "")
    )
    return head + "\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    a = p.parse_args(argv)
    cfg = DRY if a.dry_run else FULL
    if a.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --dry-run on a CPU machine")
    a.out.mkdir(parents=True, exist_ok=True)
    work = scratch("rsb-gpu-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    device = hardware.device_for(0)
    dtype = hardware.AUTOCAST[cfg["precision"]]
    micro = largest_micro_batch(cfg["arch"], cfg["img"], cfg["candidates"], device, dtype)
    workers = 1 if a.dry_run else max(1, min(14, (os.cpu_count() or 2) - 2))
    raw = override(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        {
            "models": [cfg["arch"]],
            "run": ["a1"],
            "data.mini": {**cfg["mini"], "seed": 0},
            "scale.epochs": 1e-9,
            "scale.min_epochs": 1,
            "scale.img_size": cfg["img"],
            "scale.batch_size": micro,
            "scale.lr_rule": "none",
            "train.micro_batch": micro,
            "train.precision": cfg["precision"],
            "train.workers": workers,
            "train.eval_every": 0,
            "train.threads": 0,
            "train.prefetcher": True,
        },
    )
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["data"]["prepared"] = str(prepared_mini(work, params_file))
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    distributed.init()
    r = resolve(load_params(params_file), cfg["arch"], "a1", world_size=1)
    bare = bare_epochs(r, Path(raw["data"]["prepared"]), device)
    our = ours(cfg["arch"], "a1", params_file, work)["train/img_per_s"]
    model = timm_model(cfg["arch"])
    per_worker = loader_per_worker(r, Path(raw["data"]["prepared"]), model)
    gmacs = profiling.count(timm_model(cfg["arch"]), cfg["img"])["gmacs"]
    peak = next((v for k, v in PEAK_BF16.items() if k in hardware.device_name(device)), None)

    def mfu(rate):  # training: forward + backward ~ 3 x forward; a MAC is 2 FLOPs
        return rate * 6 * gmacs * 1e9 / peak if peak and isinstance(rate, float) else None

    stage = profiling.throughput(model, cfg["bench_batch"], cfg["img"], device, dtype, True, 2, cfg["repeats"])
    plain = plain_inference(timm_model(cfg["arch"]), cfg["bench_batch"], cfg["img"], device, dtype, cfg["repeats"])
    result = {
        "device": hardware.device_name(device),
        "dry_run": a.dry_run,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "arch": cfg["arch"],
        "img": cfg["img"],
        "precision": cfg["precision"],
        "micro_batch": micro,
        "loader_workers": workers,
        "prefetcher": r.train.prefetcher,
        "gmacs": gmacs,
        "peak_bf16_flops": peak,
        "train": {
            "bare_img_s": bare,
            "ours_img_s": our,
            "ratio": our / bare,
            "mfu": mfu(our),
            "compiled_img_s": "measured last" if not a.dry_run else "not in the dry run",
            "compiled_mfu": None,
        },
        "loader": {"img_s_per_worker": per_worker, "workers_needed": bare / per_worker},
        "benchmark": {
            "stage_img_s": stage["img_per_s"],
            "plain_img_s": plain,
            "ratio": stage["img_per_s"] / plain,
            "peak_mem_mb": stage["peak_mem_mb"],
            "peak_mem_kind": stage["peak_mem_kind"],
            "batch": cfg["bench_batch"],
        },
    }
    write(a.out, result)  # everything but the compiled run, in case that one runs out of time
    if not a.dry_run:
        compiled = compiled_rate(cfg["arch"], raw, work)
        result["train"].update(compiled_img_s=compiled, compiled_mfu=mfu(compiled))
        write(a.out, result)
    print(
        f"{result['device']}: {cfg['arch']} {cfg['img']}px {cfg['precision']} micro-batch {micro}: train stage "
        f"{our:.0f} img/s vs bare {bare:.0f} ({our / bare:.3f}); loader {per_worker:.0f} img/s per worker -> "
        f"{bare / per_worker:.1f} workers; benchmark {stage['img_per_s']:.0f} img/s vs plain {plain:.0f}, "
        f"peak {stage['peak_mem_mb']:.0f} MB",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
