"""mini: the embedded default's data, a miniature ImageNet release in the official archive formats.

    python -m stages.mini --out data/mini
    python -m stages.mini --downstream data/downstream   (the transfer study's two downstream sets, rsb.data.downstream)

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsb import errors
from rsb.data.downstream import write_downstream
from rsb.data.mini import write_release
from rsb.data.spec import Data
from rsb.io import build_folder
from rsb.paramfile import load_section

STAGE = "mini"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Generate the miniature ImageNet release (official archive formats).")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", type=Path, help="folder for the archives (default: params data.raw)")
    p.add_argument("--downstream", type=Path, help="write the downstream datasets (ImageFolder layout) here instead")
    args = p.parse_args(argv)
    data = load_section(args.params, "data", Data)
    if args.downstream:
        summary = build_folder(
            args.downstream,
            STAGE,
            "--downstream",
            ("downstream.json",),
            lambda tmp: write_downstream(tmp, data.mini.seed, data.mini.image_size),
        )
        print(f"downstream datasets -> {args.downstream}: {summary}")
        return summary
    out = args.out or Path(data.raw)

    def release(tmp: Path) -> dict:
        summary = write_release(tmp, data.mini)
        (tmp / "release.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "val_labels"}, indent=2))
        return summary

    summary = build_folder(out, STAGE, "--out" if args.out else "data.raw", ("release.json",), release)
    print(f"mini release -> {out}: {summary['images']}, {sum(summary['bytes'].values()) / 1e6:.1f} MB")
    return summary


if __name__ == "__main__":
    errors.run(main)
