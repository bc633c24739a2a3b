"""evaluate@<arch>-<recipe>: top-1/top-5 on ImageNet-val, ReaL and ImageNetV2 with the paper's eval transform.

    python -m stages.evaluate --arch resnet50 --recipe a1

Transform: shorter side to int(test_img_size / crop_pct), bicubic, centre crop test_img_size, the model's own
mean/std (timm's pretrained_cfg; the scaled sizes under the mini profile). ReaL: images with an empty label list are not scored; a top-k prediction is
correct if any of its k classes is in the list. Writes metrics/eval/<name>.json and logs the same numbers into the
model's MLflow run (runs/<name>.json), so one run row holds recipe, curves and results.

Also logs the network as an MLflow model of its training run and registers it as rsb-<arch> (alias: the recipe).

Results card (2 cores AMD EPYC Zen 4, bf16, 2026-11-29, mini default, 500 val + 200 V2 images at 32 px): 0.8 s
(resnet50) to 1.3 s (resnet18) of evaluation per model; the stage takes 9-10 s with imports (torch, timm, MLflow)
and the MLflow model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch

from rsb import distributed, errors, tracking
from rsb.config import Train, check_option, load_params, resolve
from rsb.data import loader as loaders
from rsb.data.datasets import Split
from rsb.engine import predict, real_correct, topk_correct
from rsb.errors import InputError
from rsb.io import load_weights, read_json, refuse_overlap, write_json
from rsb.outputs import STUDY_RUNS, Outputs


def load_model(arch: str, weights: Path, num_classes: int, stage: str | None = None,
               img_size: int | None = None) -> torch.nn.Module:
    """The trained network, built as training built it (`img_size`: the training size, for models that fix their
    patch grid at creation)."""
    from rsb.training import model_kwargs

    if not weights.is_file():
        raise InputError(f"{weights}: no trained weights; run `dvc repro {stage or 'train@' + weights.stem}` first")
    model = timm.create_model(arch, num_classes=num_classes, **(model_kwargs(arch, img_size) if img_size else {}))
    state = load_weights(weights)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e)[:160]
        raise InputError(f"{weights}: not {arch} weights for {num_classes} classes ({first.strip()}); rerun "
                         f"`dvc repro {stage or 'train@' + weights.stem}`") from None
    return model


def evaluate_model(model: torch.nn.Module, prepared: Path, size: int, crop_pct: float, batch_size: int,
                   workers: int, precision: str) -> dict:
    device = distributed.device_for(0)
    model = model.to(device).to(memory_format=torch.channels_last)
    dtype = distributed.AUTOCAST[precision]
    tf = loaders.eval_transform(size, crop_pct, model)
    out = {}
    for split in ("val", "v2"):
        ds = Split(prepared, split, tf)
        top, labels = predict(model, loaders.eval_loader(ds, batch_size, workers, device.type == "cuda"), device,
                              dtype, channels_last=True, k=min(5, ds.num_classes))
        scores = {split: topk_correct(top, labels)}
        if split == "val":
            scores["real"] = real_correct(top, ds.real_labels())
        for name, c in scores.items():
            out.update({f"{name}/top1": 100 * c["top1"] / c["count"], f"{name}/top5": 100 * c["top5"] / c["count"],
                        f"{name}/count": c["count"]})
    out["transform"] = {"resize_shorter": int(size / crop_pct), "crop": size, "crop_pct": crop_pct,
                        "interpolation": "bicubic", "mean": list(tf.transforms[-1].mean.tolist()),
                        "std": list(tf.transforms[-1].std.tolist())}
    out["precision"] = precision
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Evaluate one trained model on val / ReaL / V2.")
    p.add_argument("--arch", required=True)
    p.add_argument("--recipe", required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--study", default=None, choices=STUDY_RUNS, help="a study's run (e.g. seeds): files under studies/<study>/")
    p.add_argument("--seed", type=int, default=None, help="the seed study's run <arch>-<recipe>-seed<N>")
    args = p.parse_args(argv)
    check_option(Train, "seed", args.seed, "--seed")
    params = load_params(args.params)
    r = resolve(params, args.arch, args.recipe, seed=args.seed)
    out = Outputs.of(args.arch, args.recipe, args.study, args.seed)
    name = out.name
    prepared = Path(params.data.prepared)
    refuse_overlap({"eval metrics": out.eval_metrics}, {"data.prepared": prepared, "data.raw": Path(params.data.raw),
                                                        "weights": out.weights})
    t0 = time.perf_counter()
    num_classes = Split(prepared, "val").num_classes
    model = load_model(args.arch, out.weights, num_classes, None if out.in_grid else out.stage, r.img_size)
    metrics = evaluate_model(model, prepared, r.test_img_size, r.recipe.crop_pct, params.evaluate.batch_size,
                             params.evaluate.workers, r.train.precision)
    metrics["eval_s"] = time.perf_counter() - t0
    write_json(out.eval_metrics, metrics)

    run_id = read_json(out.run_file).get("run_id") if out.run_file.is_file() else None
    t = tracking.start(True, params.experiment, name, run_id, {"rsb.evaluated": "true",
                                                           "rsb.eval_stage": f"evaluate@{name}"})
    t.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=r.epochs)
    t.log_artifact(out.eval_metrics, "eval")
    t.log_datasets(tracking.datasets(prepared, params.data.raw, ("val", "real", "v2")), "evaluation")
    if out.in_grid:  # a study's replicas are measurements, not models to register (seeds would flood rsb-<arch>)
        example = Split(prepared, "val", loaders.eval_transform(r.test_img_size, r.recipe.crop_pct, model))[0][0][None]
        t.log_model(model, name, args.arch, args.recipe, example,
                    {k: metrics[k] for k in ("val/top1", "val/top5", "real/top1", "real/top5", "v2/top1", "v2/top5")})
    t.end()
    print(f"{name}: val {metrics['val/top1']:.2f}  ReaL {metrics['real/top1']:.2f}  V2 {metrics['v2/top1']:.2f}")
    return metrics


if __name__ == "__main__":
    errors.run(main)
