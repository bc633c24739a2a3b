"""evaluate@<arch>-<recipe>: top-1/top-5 on ImageNet-val, ReaL and ImageNetV2 with the paper's eval transform.

    python -m stages.evaluate --arch resnet50 --recipe a1

Transform: shorter side to int(test_img_size / crop_pct), bicubic, centre crop test_img_size, the model's own
mean/std (timm's pretrained_cfg; the scaled sizes under the mini profile). ReaL's rule: rsb.evaluation.real_correct.
Writes metrics/eval/<name>.json and logs the same numbers into the model's MLflow run (runs/<name>.json), so one run
row holds recipe, curves and results.

Also logs the network as an MLflow model of its training run and registers it as rsb-<arch> (alias: the recipe).

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse

from rsb import errors, watchdog
from rsb.config import Train, check_option, load_params
from rsb.evaluation import evaluate_run
from rsb.outputs import STUDY_RUNS, Outputs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Evaluate one trained model on val / ReaL / V2.")
    p.add_argument("--arch", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument(
        "--study", default=None, choices=STUDY_RUNS, help="a study's run (e.g. seeds): files under studies/<study>/"
    )
    p.add_argument("--seed", type=int, default=None, help="the seed study's run <arch>-<recipe>-seed<N>")
    args = p.parse_args(argv)
    check_option(Train, "seed", args.seed, "--seed")
    params = load_params(args.params)
    name = Outputs.of(args.arch, args.recipe, args.study, args.seed).name
    with watchdog.stage(params.train.stall_s, f"evaluate@{name}"):  # stuck outside a loader: stacks and one line
        m = evaluate_run(params, args.arch, args.recipe, args.study, args.seed)
    print(f"{name}: val {m['val/top1']:.2f}  ReaL {m['real/top1']:.2f}  V2 {m['v2/top1']:.2f}")
    return m


if __name__ == "__main__":
    errors.run(main)
