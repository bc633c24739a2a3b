"""prepare: official archives (real ImageNet, the generated mini release, or an extracted folder) -> an index.

    python -m stages.prepare [--source mini|imagenet|folder] [--raw DIR] [--out DIR]

The files it writes: rsb.data.index; the checks and the build: rsb.data.prepare.

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rsb import errors, watchdog
from rsb.data.prepare import build
from rsb.data.spec import Data
from rsb.paramfile import load_section


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--source", choices=["mini", "imagenet", "folder"], help="override data.source")
    p.add_argument("--raw", type=Path, help="folder of archives (override data.raw)")
    p.add_argument("--out", type=Path, help="prepared folder (override data.prepared)")
    args = p.parse_args(argv)
    # params.yaml's `data` section only: prepare imports nothing of the training's configuration, so that an edit
    # there never reruns hours of indexing ImageNet (its DVC deps are what it imports: rsb.code)
    data = load_section(args.params, "data", Data)
    source, raw, out = args.source or data.source, args.raw or Path(data.raw), args.out or Path(data.prepared)
    with watchdog.stage(watchdog.STAGE_STALL_S, "prepare", "rsb.watchdog.STAGE_STALL_S"):
        info = build(
            raw, out, source, data.verify_md5 and source == "imagenet", "--out" if args.out else "data.prepared"
        )
    print(f"prepared {out}: {info['classes']} classes, {info['images']}")
    return info


if __name__ == "__main__":
    errors.run(main)
