"""Backfill: the DVC outputs logged into the store wherever MLflow lacks them (a server down at training, or dying
mid-run), idempotently."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from rsb.config import flatten
from rsb.io import read_json
from rsb.models import load_model
from rsb.tracking.registry import log_model
from rsb.tracking.runs import MlflowTracker
from rsb.tracking.store import experiment_id, output_key, tracking_uri


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(open(path))]


def _numbers(path: Path) -> dict:
    if not path.is_file():
        return {}
    return {k: v for k, v in read_json(path).items() if isinstance(v, (int, float))}


def _fill(t: MlflowTracker, params: dict, series: list[tuple[list[dict], dict[str, str]]]) -> None:
    """Log into t's run what it lacks: params not yet there, and per metric the rows after its last logged step."""
    run = t.client.get_run(t.run_id)
    t.log_params({k: v for k, v in params.items() if k not in run.data.params})
    for rows, keys in series:
        for key, name in keys.items():
            last = (
                max((m.step for m in t.client.get_metric_history(t.run_id, name)), default=-1)
                if name in run.data.metrics
                else -1
            )
            t.log_rows([r for r in rows if r["step"] > last], {key: name})


def _train_series(root: Path, name: str) -> list[tuple[list[dict], dict[str, str]]]:
    updates = _csv_rows(root / "plots/train" / f"{name}.updates.csv")
    epochs = [{**r, "step": r["epoch"]} for r in _csv_rows(root / "plots/train" / f"{name}.csv")]
    keys = {k: k.replace("_", "/", 1) for k in (epochs[0] if epochs else {}) if k not in ("epoch", "step")}
    final = [{**_numbers(root / "metrics" / kind / f"{name}.json"), "step": len(epochs)} for kind in ("train", "eval")]
    return [
        (updates, {"loss": "train/loss_step", "lr": "train/lr_step"}),
        (epochs, keys),
        *[([row], {k: k for k in row if k != "step"}) for row in final],
    ]


def backfill(experiment: str, root: Path = Path("."), prepared: Path | None = None) -> list[str]:
    """Log the DVC outputs into the current store wherever MLflow lacks them (the server was down, or died mid-run):
    each trained model's run (runs/<name>.json) gets its missing params, per-update and per-epoch metrics, final
    train and eval metrics, and is marked FINISHED (studies/<study>/runs/ too); a run that never reached the store is
    created, tagged `rsb.backfill_of`. Benchmarks without a run get one. Idempotent: a second call logs nothing."""
    client = MlflowClient(tracking_uri())
    exp_id, done = experiment_id(client, experiment), []
    studies = sorted(d for d in (root / "studies").glob("*") if d.is_dir())
    for run_file in [f for r in (root, *studies) for f in sorted((r / "runs").glob("*.json"))]:
        name, info, where = run_file.stem, read_json(run_file), run_file.parent.parent
        key = info.get("run_id") or f"{name}:{info.get('resolved', {}).get('digest', '')}"
        run_id = _existing(client, exp_id, info.get("run_id"), key)
        before = _snapshot(client, run_id) if run_id else None
        t = MlflowTracker(
            experiment,
            name,
            run_id,
            {} if run_id else {**info.get("tags", {}), "rsb.backfill_of": key},
            system_metrics=False,
        )
        _fill(t, flatten(info.get("resolved", {})), _train_series(where, name))
        if where == root:  # the grid's models are registered; a study's replicas are not (as evaluate does)
            _register(t, root, name, info.get("resolved", {}), prepared)
        t.end()
        if t.enabled and t.run_id and _snapshot(client, t.run_id) != before:
            done.append(name)
    for f in sorted((root / "metrics/benchmark").glob("*.json")):
        key = output_key(f"benchmark@{f.stem}", f)
        if not client.search_runs([exp_id], f"tags.`rsb.output_digest` = '{key}'"):
            t = MlflowTracker(
                experiment,
                f"benchmark-{f.stem}",
                None,
                {
                    "rsb.stage": f"benchmark@{f.stem}",
                    "rsb.kind": "benchmark",
                    "rsb.output_digest": key,
                    "rsb.backfill_of": key,
                },
                system_metrics=False,
            )
            t.log_metrics({f"bench/{k}": v for k, v in _numbers(f).items()})
            t.end()
            done.append(f"benchmark@{f.stem}")
    return done


def _register(t: MlflowTracker, root: Path, name: str, resolved: dict, prepared: Path | None) -> None:
    """An evaluated model that the store has no version of (the server was down at evaluate) is logged and
    registered; one that has a version is left alone."""
    weights, evaluated = root / "models" / f"{name}.safetensors", root / "metrics/eval" / f"{name}.json"
    if not (weights.is_file() and evaluated.is_file() and prepared and resolved):
        return
    classes = len(read_json(Path(prepared) / "classes.json"))
    model = load_model(resolved["arch"], weights, classes, img_size=resolved["img_size"])
    size = resolved["test_img_size"]
    metrics = {k: v for k, v in _numbers(evaluated).items() if k.endswith(("top1", "top5"))}
    log_model(t, model, name, resolved["arch"], resolved["recipe_name"], torch.zeros(1, 3, size, size), metrics)


def _existing(client, exp_id: str, run_id: str | None, key: str) -> str | None:
    if run_id:
        try:
            return client.get_run(run_id).info.run_id
        except Exception:  # noqa: BLE001 - not in this store
            pass
    found = client.search_runs([exp_id], f"tags.`rsb.backfill_of` = '{key}'")
    return found[0].info.run_id if found else None


def _snapshot(client, run_id: str) -> tuple:
    run = client.get_run(run_id)
    steps = {k: len(client.get_metric_history(run_id, k)) for k in run.data.metrics}
    return run.info.status, len(run.data.params), tuple(sorted(steps.items()))
