"""Params, GMACs, inference throughput and peak memory of an architecture (the paper's figure-4 columns).

GMACs come from DeepSpeed's flops profiler (as timm's benchmark.py uses it): multiply-accumulates, which is what the
paper's "FLOPs" and timm's tables count (resnet50 at 224: 4.09). Throughput is timed after warm-up, per batch, with a
device synchronize around each timed batch; the median batch gives img/s. Peak memory: on CUDA the allocator's peak
after a reset; on a CPU the process's peak resident set (ru_maxrss), which includes the interpreter and libraries.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import timm
import torch

from rsb import hardware, tracking, watchdog
from rsb.config import Params, check_arch
from rsb.hardware import autocast
from rsb.io import write_json


def count(model: torch.nn.Module, img_size: int) -> dict:
    from deepspeed.profiling.flops_profiler import get_model_profile

    _, macs, params = get_model_profile(
        model, input_shape=(1, 3, img_size, img_size), print_profile=False, detailed=False, as_string=False
    )
    return {"params_m": params / 1e6, "gmacs": macs / 1e9}


def throughput(
    model: torch.nn.Module,
    batch: int,
    img_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    warmup: int,
    repeats: int,
) -> dict:
    model = model.eval().to(device)
    x = torch.randn(batch, 3, img_size, img_size, device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            watchdog.beat(i)
            sync()
            t0 = time.perf_counter()
            with autocast(device, dtype):
                model(x)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device) / 2**20, "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu process peak RSS (ru_maxrss)"
    med = statistics.median(times)
    return {
        "img_per_s": batch / med,
        "batch_ms_median": 1000 * med,
        "batch_ms": [1000 * t for t in times],
        "peak_mem_mb": peak,
        "peak_mem_kind": kind,
    }


def benchmark(params: Params, arch: str) -> dict:
    """benchmark@<arch>: the figure-4 columns for `arch` at params.yaml's `benchmark` settings, written to
    metrics/benchmark/<arch>.json and logged as a `benchmark` run."""
    check_arch(params, arch)
    b = params.benchmark
    t0 = time.perf_counter()
    device = hardware.device_for(0)
    precision = hardware.checked_precision(b.precision, device)
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=1000)
    metrics = {"arch": arch, **count(model, 224)}
    metrics.update(
        throughput(
            model, b.batch_size, b.img_size, device, hardware.AUTOCAST[precision], b.channels_last, b.warmup, b.repeats
        )
    )
    metrics.update(
        {
            "batch": b.batch_size,
            "resolution": b.img_size,
            "precision": precision,
            "channels_last": b.channels_last,
            "warmup": b.warmup,
            "repeats": b.repeats,
            "device": hardware.device_name(device),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "timm": timm.__version__,
                "deepspeed": version("deepspeed"),
            },
            "bench_s": time.perf_counter() - t0,
        }
    )
    out = Path("metrics/benchmark") / f"{arch}.json"
    write_json(out, metrics)
    stage = f"benchmark@{arch}"
    t = tracking.start(
        True,
        params.experiment,
        f"benchmark-{arch}",
        None,
        {
            **tracking.provenance(stage, tracking.digest(b)),
            "rsb.arch": arch,
            "rsb.kind": "benchmark",
            "rsb.output_digest": tracking.output_key(stage, out),
        },
    )
    t.log_params(
        {
            k: v
            for k, v in metrics.items()
            if k in ("batch", "resolution", "precision", "device", "channels_last", "warmup", "repeats")
        }
    )
    t.log_metrics({f"bench/{k}": metrics[k] for k in ("params_m", "gmacs", "img_per_s", "peak_mem_mb")})
    t.log_artifact(out, "benchmark")
    t.end()
    return metrics
