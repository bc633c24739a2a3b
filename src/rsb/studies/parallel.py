"""The seed study's trainings side by side, N at once on one node, still one DVC pipeline:

    python -m rsb.studies.parallel -j 8          (with train.slots: 8 committed in params.yaml)

Each seed k of `seeds.seeds` becomes one queued DVC experiment, `dvc exp run --queue -n <tag>-seed<k>
-S seeds.seeds=[k] studies/dvc.yaml:seed-evaluate@k`; `dvc queue start -j N` runs N of them at once, each in its own
copy of the project, and each training claims its own slot of the node's GPUs (or cores) through rsb.launch
(rsb.claim). Every output of a seed's training and evaluation is cached (or a metric), so DVC's run-cache keeps
each run; `dvc repro studies/dvc.yaml:seeds-report` in this workspace then restores every seed from it (nothing is
trained twice: the stage of seed k is the same whatever the list) and writes the report, as the sequential
`dvc repro` would. A seed that failed is named with the command that shows its log; the report is not made.

Several nodes: give each node its own clone with one shared DVC cache (`dvc cache dir /shared/dvc-cache`: the
run-cache lives in it) and a part of the seeds, `--seeds 1-50 --no-report` on one node and `--seeds 51-100
--no-report` on the other; then `dvc repro studies/dvc.yaml:seeds-report` on any of them restores all 100.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from rsb import errors
from rsb.config import ConfigError, load_params

ACTIVE = re.compile(r"\b(Queued|Running)\b")


def dvc(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    out = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if out.returncode != 0:
        detail = " ".join((out.stderr or out.stdout).split())[-600:]
        raise ConfigError(f"`dvc {' '.join(args)}` failed ({detail}); fix that and rerun this command")
    if not quiet and out.stdout.strip():
        print(out.stdout.rstrip())
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-j", "--jobs", type=int, required=True, help="trainings at once (train.slots)")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--poll", type=float, default=10.0, help="seconds between `dvc queue status` checks")
    p.add_argument("--seeds", default=None, help="a part of seeds.seeds for this node: '1-50' or '3,5,8'")
    p.add_argument("--no-report", action="store_true", help="train and evaluate only (other nodes have the rest)")
    a = p.parse_args(argv)
    params = load_params(a.params)
    seeds = list(params.seeds.seeds) if a.seeds is None else part(a.seeds, list(params.seeds.seeds))
    if a.jobs < 1:
        raise ConfigError(f"-j {a.jobs}: run at least one training at a time")
    if a.jobs > 1 and params.train.slots < a.jobs:
        raise ConfigError(
            f"{a.params}: train.slots = {params.train.slots}, but -j {a.jobs} trainings would share the node: set "
            f"train.slots: {a.jobs} (and commit it) so that each claims its own GPUs or cores"
        )
    tag = time.strftime("%m%d-%H%M%S")
    names = {seed: f"{tag}-seed{seed}" for seed in seeds}
    for seed, name in names.items():
        dvc(
            "exp", "run", "--queue", "-n", name, "-S", f"seeds.seeds=[{seed}]", f"studies/dvc.yaml:seed-evaluate@{seed}"
        )
    # the workers `dvc queue start` leaves running inherit its output: not captured, or this would wait for them
    subprocess.run(["dvc", "queue", "start", "-j", str(a.jobs)], check=True, stdout=subprocess.DEVNULL)
    print(f"{len(names)} seeds queued, {a.jobs} at a time: `dvc queue status` / `dvc queue logs <name>` meanwhile")
    try:
        while True:
            time.sleep(a.poll)
            status = dvc("queue", "status", quiet=True).stdout
            mine = [ln for ln in status.splitlines() if any(n in ln for n in names.values())]
            if not any(ACTIVE.search(ln) for ln in mine):
                break
    finally:
        subprocess.run(["dvc", "queue", "stop"], capture_output=True)  # no idle worker outlives the study
    failed = [n for n in names.values() if not any(n in ln and "Success" in ln for ln in mine)]
    if failed:
        raise ConfigError(
            f"seed run(s) {', '.join(failed)} did not succeed; `dvc queue logs <name>` shows why. Rerun this "
            "command: finished seeds are restored from DVC's run-cache, not trained again"
        )
    if a.no_report:
        return
    out = subprocess.run(["dvc", "repro", "studies/dvc.yaml:seeds-report"])
    if out.returncode != 0:
        sys.exit(out.returncode)


def part(text: str, listed: list[int]) -> list[int]:
    """--seeds '1-50' or '3,5,8': each must be in seeds.seeds (the report's list)."""
    try:
        chosen: list[int] = []
        for piece in text.split(","):
            lo, _, hi = piece.strip().partition("-")
            chosen += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: write a range '1-50' or a list '3,5,8'") from None
    if missing := sorted(set(chosen) - set(listed)):
        raise ConfigError(f"--seeds: {missing[:10]} not in seeds.seeds; the report lists only those")
    return chosen


if __name__ == "__main__":
    errors.run(main)
