"""benchmark@<arch>: params (M), GMACs at 224, inference img/s and peak memory at batch 128 (the paper's figure 4).

    python -m stages.benchmark --arch resnet50

Architecture-level: it depends on the architecture and the benchmark params, not on training, and measures the
ImageNet model (1000 classes) at the paper's 224 x 224 so that params and GMACs compare with the paper's table.
Precision auto: bf16 autocast on GPUs (the paper's AMP), fp32 on CPUs without native bf16.

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse

from rsb import errors, profiling, watchdog
from rsb.config import load_params


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Benchmark one architecture.")
    p.add_argument("--arch", required=True)
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    with watchdog.stage(params.train.stall_s, f"benchmark@{args.arch}"):
        metrics = profiling.benchmark(params, args.arch)
    print(
        f"{args.arch}: {metrics['params_m']:.2f} M params, {metrics['gmacs']:.3f} GMACs, "
        f"{metrics['img_per_s']:.1f} img/s, {metrics['peak_mem_mb']:.0f} MB on {metrics['device']}"
    )
    return metrics


if __name__ == "__main__":
    errors.run(main)
