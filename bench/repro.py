"""The whole default `dvc repro` on a fresh clone, with the wall time of every stage.

    python -m bench.repro [--keep DIR] [-S key=value ...]

Clones HEAD into a temporary folder (or DIR), runs `dvc repro` there (with `-S` overrides applied to params.yaml
first, e.g. `-S scale.epochs=0.01`), and prints one line per stage and the total. Stage time = from its
"Running stage" line to the next one (DVC runs stages one after another).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

from rsb.config import override

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=Path, help="clone here and keep it (default: a temp folder)")
    p.add_argument("-S", dest="overrides", action="append", default=[], help="params.yaml key=value (YAML value)")
    a = p.parse_args()
    repo = a.keep or Path(tempfile.mkdtemp(prefix="rsb-repro-")) / "rsb"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
    if a.overrides:
        params = override(
            yaml.safe_load((repo / "params.yaml").read_text()),
            {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in a.overrides)},
        )
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RSB_TRACKING")}
    t0 = time.perf_counter()
    marks = []
    with subprocess.Popen(
        ["dvc", "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            if line.startswith("Running stage"):
                marks.append((line.split("'")[1], time.perf_counter()))
            if line.startswith(("Running stage", "error", "ERROR")) or "val top-1" in line or "img/s" in line:
                print(line.rstrip(), flush=True)
    total = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"dvc repro failed ({proc.returncode}) in {repo}")
    ends = [t for _, t in marks[1:]] + [t0 + total]
    print("\n| stage | wall s |\n|---|---|")
    for (name, start), end in zip(marks, ends):
        print(f"| {name} | {end - start:.1f} |")
    print(f"| **total `dvc repro`** (incl. DVC's own start-up and hashing) | **{total:.1f}** |")
    print(f"\nclone: {repo}")


if __name__ == "__main__":
    main()
