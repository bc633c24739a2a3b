"""benchmark@<arch>: params (M), GMACs at 224, inference img/s and peak memory at batch 128 (the paper's figure 4).

    python -m stages.benchmark --arch resnet50

Architecture-level: it depends on the architecture and the benchmark params, not on training, and measures the
ImageNet model (1000 classes) at the paper's 224 x 224 so that params and GMACs compare with the paper's table.
Precision auto: bf16 autocast on GPUs (the paper's AMP), fp32 on CPUs without native bf16.

Results card (2 cores AMD EPYC, 2026-11-27, fp32 + channels_last, batch 128 at 224, 1 warm-up + 2 timed batches):
    resnet50: 25.56 M params, 4.089 GMACs,  9.2-10.0 img/s, 2,465 MB peak RSS, 41-46 s (two runs)
    resnet18: 11.69 M params, 1.814 GMACs, 26.8-30.9 img/s, 1,879-1,889 MB peak RSS, 16-18 s
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import timm
import torch

from rsb import errors, hardware, profiling, tracking
from rsb.config import check_arch, load_params
from rsb.io import write_json


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Benchmark one architecture.")
    p.add_argument("--arch", required=True)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    check_arch(params, args.arch)
    b = params.benchmark
    t0 = time.perf_counter()
    device = hardware.device_for(0)
    precision = hardware.checked_precision(b.precision, device)
    torch.manual_seed(0)
    model = timm.create_model(args.arch, num_classes=1000)
    metrics = {"arch": args.arch, **profiling.count(model, 224)}
    metrics.update(profiling.throughput(model, b.batch_size, b.img_size, device, hardware.AUTOCAST[precision],
                                        b.channels_last, b.warmup, b.repeats))
    metrics.update({"batch": b.batch_size, "resolution": b.img_size, "precision": precision,
                    "channels_last": b.channels_last, "warmup": b.warmup, "repeats": b.repeats,
                    "device": hardware.device_name(device),
                    "versions": {"python": platform.python_version(), "torch": torch.__version__,
                                 "timm": timm.__version__, "deepspeed": _version("deepspeed")},
                    "bench_s": time.perf_counter() - t0})
    out = Path("metrics/benchmark") / f"{args.arch}.json"
    write_json(out, metrics)
    stage = f"benchmark@{args.arch}"
    t = tracking.start(True, params.experiment, f"benchmark-{args.arch}", None,
                       {**tracking.provenance(stage, tracking.digest(b)), "rsb.arch": args.arch,
                        "rsb.kind": "benchmark", "rsb.output_digest": tracking.output_key(stage, out)})
    t.log_params({k: v for k, v in metrics.items() if k in ("batch", "resolution", "precision", "device",
                                                             "channels_last", "warmup", "repeats")})
    t.log_metrics({f"bench/{k}": metrics[k] for k in ("params_m", "gmacs", "img_per_s", "peak_mem_mb")})
    t.log_artifact(out, "benchmark")
    t.end()
    print(f"{args.arch}: {metrics['params_m']:.2f} M params, {metrics['gmacs']:.3f} GMACs, "
          f"{metrics['img_per_s']:.1f} img/s, {metrics['peak_mem_mb']:.0f} MB on {metrics['device']}")
    return metrics


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


if __name__ == "__main__":
    errors.run(main)
