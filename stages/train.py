"""train@<arch>-<recipe>: one of the paper's recipes, scaled by params.yaml `scale`, with DeepSpeed on 1..N processes.

    python -m rsb.launch --nodes 1 --devices 8 stages.train --arch resnet50 --recipe a1   (what dvc.yaml runs: one
                                                        process runs the stage directly, more go through `deepspeed`)
    python -m stages.train --arch resnet18 --recipe a3                                   (one process, no launcher)

The job itself is rsb.trainer.train_recipe.

Writes models/<name>.safetensors (the weights), metrics/train/<name>.json, plots/train/<name>.csv (per epoch) and
<name>.updates.csv (per update), runs/<name>.json (MLflow run + resolved recipe); keeps checkpoints/<name>/<digest>/
to resume from. Rerunning after an interruption resumes from the last finished epoch.

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse

from rsb import errors, trainer
from rsb.config import Train, check_option, load_params
from rsb.outputs import STUDY_RUNS


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Train one (architecture, recipe) with DeepSpeed.")
    p.add_argument("--arch", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--study", default=None, choices=STUDY_RUNS, help="a study's run (e.g. seeds): outputs under studies/<study>/"
    )
    p.add_argument("--seed", type=int, default=None, help="replaces train.seed; the run is <arch>-<recipe>-seed<N>")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by older launchers
    args = p.parse_args(argv)
    check_option(Train, "seed", args.seed, "--seed")
    return trainer.train_recipe(load_params(args.params), args.arch, args.recipe, args.study, args.seed)


if __name__ == "__main__":
    errors.run(main, errors.rank())  # the launcher stops the other ranks; the line says which one failed, and why
