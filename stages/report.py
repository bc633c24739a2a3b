"""report: the paper's figure 4 for every trained (arch, recipe), beside the published numbers.

    python -m stages.report

Reads only the stages' JSON metrics (metrics/train, metrics/eval, metrics/benchmark) and data/prepared/info.json,
never MLflow; writes reports/figure4.md, .csv and .png, and logs them as the artifacts of a "report" MLflow run. The
caption states the scale and the device, so a mini run is never mistaken for the paper's.

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rsb import errors, report
from rsb.config import load_params


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Build the figure-4 table.")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    table = report.figure4(load_params(args.params), args.metrics, args.out)
    print((args.out / "figure4.md").read_text())
    return {"rows": len(table)}


if __name__ == "__main__":
    errors.run(main)
