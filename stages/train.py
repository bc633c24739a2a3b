"""train@<arch>-<recipe>: one of the paper's recipes, scaled by params.yaml `scale`, with DeepSpeed on 1..N processes.

    python -m rsb.launch --nodes 1 --devices 8 stages.train --arch resnet50 --recipe a1   (what dvc.yaml runs: one
                                                        process runs the stage directly, more go through `deepspeed`)
    python -m stages.train --arch resnet18 --recipe a3                                   (one process, no launcher)

The job itself is rsb.trainer.train_recipe.

Writes models/<name>.safetensors (the weights), metrics/train/<name>.json, plots/train/<name>.csv (per epoch) and
<name>.updates.csv (per update), runs/<name>.json (MLflow run + resolved recipe); keeps checkpoints/<name>/<digest>/
to resume from. Rerunning after an interruption resumes from the last finished epoch.

Results card (2 cores AMD EPYC Zen 4, native bf16 so bf16 autocast + channels_last, 2026-11-29, mini default,
batch 64 = 2 x 32 accumulated, `dvc repro` on a fresh clone; stage wall includes ~9-11 s of imports, DeepSpeed init,
validation and checkpoints):
    resnet50  a1 3 ep 32 px: 121 img/s, 39 s training, val 25.6%   a2 2 ep: 106 img/s, 29 s, 23.8%
              a3 2 ep 23 px: 127 img/s, 26 s,          val 20.0%
    resnet18  a1: 208 img/s, 22 s, 23.6%   a2: 216 img/s, 14 s, 21.2%   a3: 210 img/s, 15 s, 21.6%   (chance: 5%)
(fp32 on an EPYC without AVX-512, 2026-11-27: resnet50 ~49 img/s, resnet18 ~74-85 img/s.)
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
    p.add_argument("--study", default=None, choices=STUDY_RUNS, help="a study's run (e.g. seeds): outputs under studies/<study>/")
    p.add_argument("--seed", type=int, default=None, help="replaces train.seed; the run is <arch>-<recipe>-seed<N>")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by older launchers
    args = p.parse_args(argv)
    check_option(Train, "seed", args.seed, "--seed")
    return trainer.train_recipe(load_params(args.params), args.arch, args.recipe, args.study, args.seed)


if __name__ == "__main__":
    errors.run(main, errors.rank())  # the launcher stops the other ranks; the line says which one failed, and why
