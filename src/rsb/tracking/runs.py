"""A run's logging: MLflow on rank 0, a no-op elsewhere and in unit tests.

Tracking never stops training: if the server is down or dies mid-run, the first failed call disables the tracker
with one warning, every number still lands in the DVC outputs, and `python -m rsb.tracking backfill` logs them later.

MLflow itself is imported where a tracker starts (`_mlflow`), not at the top: ranks that do not log, and a machine
that runs with RSB_TRACKING=off and has no MLflow installed (the GPU check's image), never import it.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from rsb.io import read_json
from rsb.tracking.store import experiment_id, provenance, redact, tracking_uri


class Tracker:
    """The null tracker: what non-zero ranks and unit tests get."""

    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_rows(self, rows: list[dict], keys: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_datasets(self, datasets: list[dict], context: str) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


def _mlflow():
    """MLflow's entities, client and system-metrics monitor (imported on first use, see above)."""
    from mlflow import entities
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    from mlflow.tracking import MlflowClient

    return entities, MlflowClient, SystemMetricsMonitor


class MlflowTracker(Tracker):
    def __init__(
        self,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        tags: dict | None = None,
        system_metrics: bool = True,
    ):
        self.uri, self.enabled, self._monitor = tracking_uri(), True, None
        self.safe(self._start, experiment, run_name, run_id, tags or {}, system_metrics)

    def _start(self, experiment, run_name, run_id, tags, system_metrics):
        self.entities, client, monitor = _mlflow()
        self.client = client(self.uri)
        self.experiment_id = experiment_id(self.client, experiment)
        if run_id is None:
            tags = {k: str(v) for k, v in tags.items()}
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        else:  # resuming a run, or evaluate adding to the model's run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags)
        if system_metrics:
            self._monitor = monitor(self.run_id, sampling_interval=10)
            self._monitor.start()

    def safe(self, fn, *args) -> None:
        """fn(*args), or nothing once tracking is off; its first failure turns tracking off with one warning."""
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.enabled = False
            warnings.warn(
                f"MLflow at {redact(self.uri)} failed ({type(e).__name__}: {redact(str(e))[:200]}); "
                "tracking is off for the rest of this run. Every number is in the DVC outputs; log them "
                "later with `python -m rsb.tracking backfill`",
                RuntimeWarning,
                stacklevel=3,
            )

    def log_params(self, params: dict) -> None:
        items = [self.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.safe(self.client.log_batch, self.run_id, [], items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.log_rows([{"step": step or 0, **metrics}], {k: k for k in metrics})

    def log_rows(self, rows: list[dict], keys: dict[str, str]) -> None:
        """Many metrics in few calls (sqlite costs ~4 ms a call): rows of {step, key: value}, keys {row key: name}."""
        ts = int(time.time() * 1000)
        ms = [
            self.entities.Metric(name, float(r[k]), ts, int(r["step"]))
            for r in rows
            for k, name in keys.items()
            if k in r
        ]
        for i in range(0, len(ms), 1000):
            self.safe(self.client.log_batch, self.run_id, ms[i : i + 1000])

    def set_tags(self, tags: dict) -> None:
        self.safe(
            self.client.log_batch, self.run_id, [], [], [self.entities.RunTag(k, str(v)) for k, v in tags.items()]
        )

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.safe(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_datasets(self, datasets: list[dict], context: str) -> None:
        self.safe(log_datasets, self.client, self.run_id, datasets, context)

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self.safe(self.client.set_terminated, self.run_id, status)


def start(
    main_process: bool, experiment: str, run_name: str, run_id: str | None = None, tags: dict | None = None
) -> Tracker:
    if not main_process or os.environ.get("RSB_TRACKING") == "off":
        return Tracker()
    exp = os.environ.get("DVC_EXP_NAME")  # runs of several experiments stay apart in the UI's Compare view
    return MlflowTracker(experiment, f"{run_name} @{exp}" if exp else run_name, run_id, tags)


def study_run(
    experiment: str,
    study: str,
    label: str,
    metrics: dict,
    files: list[Path],
    children: list[str],
    params_hash: str,
    prepared: Path | None,
) -> str | None:
    """A study as one parent run: its report files as artifacts, its summary numbers as metrics, and the trainings
    it summarized re-parented under it (`mlflow.parentRunId`, which the UI nests by). Each report makes a new parent,
    so two studies compare side by side; a training belongs to the newest study that used it (`rsb.children` keeps
    every study's own list)."""
    t = start(
        True,
        experiment,
        f"study {study}: {label}",
        None,
        {
            **provenance(f"studies/dvc.yaml:{study}", params_hash, prepared),
            "rsb.kind": "study",
            "rsb.study": study,
            "rsb.children": ",".join(children),
        },
    )
    t.log_metrics(metrics)
    for f in files:
        t.log_artifact(f, "report")
    if isinstance(t, MlflowTracker):
        for run_id in children:
            t.safe(t.client.set_tag, run_id, "mlflow.parentRunId", t.run_id)
    t.end()
    return getattr(t, "run_id", None)


def datasets(prepared: Path, source: str, splits: tuple[str, ...]) -> list[dict]:
    """MLflow dataset inputs for splits of the prepared data: name, source (data.raw), the content digest, counts."""
    info = read_json(Path(prepared) / "info.json")
    names = {"train": "train", "val": "val", "real": "val (ReaL labels)", "v2": "ImageNetV2 matched-frequency"}
    return [
        {
            "name": f"{info['source']} {names[s]}",
            "source": source,
            "digest": info["digest"][:16],
            "profile": {"images": info["images"]["val" if s == "real" else s], "scored": info["real_scored"]}
            if s == "real"
            else {"images": info["images"][s], "classes": info["classes"]},
        }
        for s in splits
    ]


def log_datasets(client, run_id: str, items: list[dict], context: str) -> None:
    """Each item as a dataset input of the run (the UI's Datasets column; `datasets.digest` in searches)."""
    e, _, _ = _mlflow()
    inputs = [
        e.DatasetInput(
            e.Dataset(
                name=d["name"],
                digest=d["digest"],
                source_type="local",
                source=json.dumps({"uri": d["source"]}),
                profile=json.dumps(d["profile"]),
            ),
            [e.InputTag("mlflow.data.context", context)],
        )
        for d in items
    ]
    client.log_inputs(run_id, datasets=inputs)
