"""Evaluation with the paper's eval transform: top-1/top-5 on ImageNet-val, ReaL and ImageNetV2 (evaluate@<name>).

Transform: shorter side to int(test_img_size / crop_pct), bicubic, centre crop test_img_size, the model's own
mean/std (timm's pretrained_cfg). Val and V2 are scored by `rsb.engine.topk_correct`, the rule the validation between
epochs uses; ReaL by `real_correct` here, with its labels read by `real_labels`: ReaL is the evaluation's alone, so an
edit to it reruns the evaluate stages and no training (rsb.code derives each stage's deps from its imports).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from rsb import hardware, tracking
from rsb import loader as loaders
from rsb.config import Params, resolve
from rsb.data.datasets import Split
from rsb.engine import predict, topk_correct
from rsb.io import read_json, refuse_overlap, write_json
from rsb.models import load_model
from rsb.outputs import EMA_STUDY, Outputs


def real_labels(val: Split) -> list[list[int]]:
    """ReaL's label list for each val image, in the dataset's order (real.json is by val file number:
    entry i is ILSVRC2012_val_{i+1:08d}.JPEG)."""
    real = read_json(val.root / "real.json")
    return [real[int(p.stem.rsplit("_", 1)[1]) - 1] for p, _ in val.samples]


def real_correct(top: torch.Tensor, real: list[list[int]]) -> dict[str, int]:
    """The ReaL rule (Beyer et al. 2020, as timm's RealLabelsImagenet): an image with an empty label list is not
    scored; a top-k prediction is correct if any of its k classes is in the image's list."""
    out = {"top1": 0, "top5": 0, "count": 0}
    for pred, labels in zip(top.tolist(), real):
        if labels:
            out["count"] += 1
            out["top1"] += pred[0] in labels
            out["top5"] += any(p in labels for p in pred[:5])
    return out


def evaluate_model(
    model: torch.nn.Module, prepared: Path, size: int, crop_pct: float, batch_size: int, workers: int, precision: str
) -> dict:
    device = hardware.device_for(0)
    model = model.to(device).to(memory_format=torch.channels_last)
    precision = hardware.checked_precision(precision, device)  # `auto` resolved: the JSON says what ran
    dtype = hardware.AUTOCAST[precision]
    tf = loaders.eval_transform(size, crop_pct, model)
    out: dict[str, Any] = {}
    for split in ("val", "v2"):
        ds = Split(prepared, split, tf)
        top, labels = predict(
            model,
            loaders.eval_loader(ds, batch_size, workers, device.type == "cuda"),
            device,
            dtype,
            channels_last=True,
            k=min(5, ds.num_classes),
        )
        scores = {split: topk_correct(top, labels)}
        if split == "val":
            scores["real"] = real_correct(top, real_labels(ds))
        for name, c in scores.items():
            out.update(
                {
                    f"{name}/top1": 100 * c["top1"] / c["count"],
                    f"{name}/top5": 100 * c["top5"] / c["count"],
                    f"{name}/count": c["count"],
                }
            )
    out["transform"] = {
        "resize_shorter": int(size / crop_pct),
        "crop": size,
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "mean": list(tf.transforms[-1].mean.tolist()),
        "std": list(tf.transforms[-1].std.tolist()),
    }
    out["precision"], out["device"] = precision, hardware.device_name(device)
    return out


def evaluate_run(params: Params, arch: str, recipe: str, study: str | None = None, seed: int | None = None) -> dict:
    """evaluate@<name>: the trained model of (arch, recipe[, study, seed]) on val, ReaL and V2;
    metrics/eval/<name>.json, the same numbers in its MLflow run, and (grid models) the model registered as
    rsb-<arch>@<recipe>."""
    r = resolve(params, arch, recipe, seed=seed)
    out = Outputs.of(arch, recipe, study, seed)
    name = out.name
    prepared = Path(params.data.prepared)
    refuse_overlap(
        {"eval metrics": out.eval_metrics},
        {"data.prepared": prepared, "data.raw": Path(params.data.raw), "weights": out.weights},
    )
    t0 = time.perf_counter()
    num_classes = Split(prepared, "val").num_classes
    model = load_model(arch, out.weights, num_classes, None if out.in_grid else out.stage, r.img_size)

    def scores(m: torch.nn.Module) -> dict:
        e = params.evaluate
        return evaluate_model(
            m, prepared, r.test_img_size, r.recipe.crop_pct, e.batch_size, e.workers, r.train.precision
        )

    metrics = scores(model)
    if out.study == EMA_STUDY and read_json(out.ema_dir / "ema.json").get("model_ema"):
        # the model EMA (T2: DeiT's --model-ema), scored the same way beside the model: ema/val/top1, ...
        ema = scores(load_model(arch, out.ema_weights, num_classes, out.stage, r.img_size))
        metrics.update({f"ema/{k}": v for k, v in ema.items() if "/" in k})
    metrics["eval_s"] = time.perf_counter() - t0
    write_json(out.eval_metrics, metrics)

    run_id = read_json(out.run_file).get("run_id") if out.run_file.is_file() else None
    t = tracking.start(
        True,
        params.experiment,
        name,
        run_id,
        {
            "rsb.evaluated": "true",
            "rsb.eval_stage": f"evaluate@{name}",
            "rsb.eval_device": metrics["device"],
            "rsb.eval_precision": metrics["precision"],
        },
    )
    t.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=r.epochs)
    t.log_artifact(out.eval_metrics, "eval")
    t.log_datasets(tracking.datasets(prepared, params.data.raw, ("val", "real", "v2")), "evaluation")
    # a study's replicas are measurements, not models to register (seeds would flood rsb-<arch>); the registry imports
    # MLflow's model flavours, which a machine tracking nothing may not have (the GPU check's image)
    if out.in_grid and isinstance(t, tracking.MlflowTracker):
        from rsb.tracking.registry import log_model

        example = Split(prepared, "val", loaders.eval_transform(r.test_img_size, r.recipe.crop_pct, model))[0][0][None]
        log_model(
            t,
            model,
            name,
            arch,
            recipe,
            example,
            {k: metrics[k] for k in ("val/top1", "val/top5", "real/top1", "real/top5", "v2/top1", "v2/top5")},
        )
    t.end()
    return metrics
