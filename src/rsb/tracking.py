"""The one logging sink: MLflow on rank 0, a no-op elsewhere and in unit tests.

Store: MLFLOW_TRACKING_URI when set, else `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`,
where <project> is the repository that `dvc exp run --temp/--queue` copied from (they run under
<project>/.dvc/tmp/exps/...), so every run of the project lands in one store.

Tracking never stops training: if the server is down or dies mid-run, the first failed call disables the tracker
with one warning, every number still lands in the DVC outputs, and `python -m rsb.tracking backfill` logs them later.
"""
from __future__ import annotations

import os
import re
import subprocess
import warnings
from pathlib import Path

EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def project_root(cwd: Path | None = None) -> Path:
    cwd = str((cwd or Path.cwd()).resolve())
    return Path(cwd.split(EXPS_MARKER)[0]) if EXPS_MARKER in cwd else Path(cwd)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """Credentials in a tracking URI (user:password@host) never reach logs or output."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def git_commit(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker:
    """The null tracker: what non-zero ranks and unit tests get."""
    run_id: str | None = None
    experiment_id: str | None = None

    def log_params(self, params: dict) -> None: ...
    def log_metrics(self, metrics: dict, step: int | None = None) -> None: ...
    def log_rows(self, rows: list[dict], keys: dict[str, str]) -> None: ...
    def set_tags(self, tags: dict) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    def __init__(self, experiment: str, run_name: str, run_id: str | None = None, tags: dict | None = None,
                 system_metrics: bool = True):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # a dead server costs seconds, not minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.enabled, self._monitor = tracking_uri(), True, None
        self._safe(self._start, experiment, run_name, run_id, tags or {}, system_metrics)

    def _start(self, experiment, run_name, run_id, tags, system_metrics):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(self.uri)
        self.experiment_id = experiment_id(self.client, experiment)
        if run_id is None:
            tags = {k: str(v) for k, v in tags.items()}
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        else:  # resuming a run, or evaluate adding to the model's run
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags)
        if system_metrics:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10)
            self._monitor.start()

    def _safe(self, fn, *args) -> None:
        if not self.enabled:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must never stop training
            self.enabled = False
            warnings.warn(f"MLflow at {redact(self.uri)} failed ({type(e).__name__}: {redact(str(e))[:200]}); tracking is "
                          "off for the rest of this run. Every number is in the DVC outputs; log them later with "
                          "`python -m rsb.tracking backfill`", RuntimeWarning, stacklevel=3)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._safe(self.client.log_batch, self.run_id, [], items[i:i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.log_rows([{"step": step or 0, **metrics}], {k: k for k in metrics})

    def log_rows(self, rows: list[dict], keys: dict[str, str]) -> None:
        """Many metrics in few calls (sqlite costs ~4 ms a call): rows of {step, key: value}, keys {row key: name}."""
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(name, float(r[k]), ts, int(r["step"])) for r in rows for k, name in keys.items() if k in r]
        for i in range(0, len(ms), 1000):
            self._safe(self.client.log_batch, self.run_id, ms[i:i + 1000])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self._safe(self.client.log_batch, self.run_id, [], [], [RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._safe(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self._safe(self.client.set_terminated, self.run_id, status)


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri())
    except Exception:  # noqa: BLE001 - a concurrent run created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start(main_process: bool, experiment: str, run_name: str, run_id: str | None = None,
          tags: dict | None = None) -> Tracker:
    if not main_process or os.environ.get("RSB_TRACKING") == "off":
        return Tracker()
    return MlflowTracker(experiment, run_name, run_id, tags)


def _csv_rows(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(open(path))]


def backfill(experiment: str, root: Path = Path(".")) -> list[str]:
    """Log every trained run's DVC outputs (runs/, plots/train/, metrics/) into the current store, for the runs whose
    MLflow run is missing or unfinished there (the server was down). Idempotent: a back-filled run is found by tag."""
    import json

    from mlflow.tracking import MlflowClient

    from rsb.config import flatten

    client = MlflowClient(tracking_uri())
    exp_id, done = experiment_id(client, experiment), []
    for run_file in sorted((root / "runs").glob("*.json")):
        name, info = run_file.stem, json.loads(run_file.read_text())
        key = info.get("run_id") or f"{name}:{info.get('resolved', {}).get('digest', '')}"
        try:
            if info.get("run_id") and client.get_run(info["run_id"]).info.status == "FINISHED":
                continue
        except Exception:  # noqa: BLE001 - not in this store
            pass
        if client.search_runs([exp_id], f"tags.`rsb.backfill_of` = '{key}'"):
            continue
        t = MlflowTracker(experiment, name, None, {**info.get("tags", {}), "rsb.backfill_of": key},
                          system_metrics=False)
        t.log_params(flatten(info.get("resolved", {})))
        t.log_rows(_csv_rows(root / "plots/train" / f"{name}.updates.csv"), {"loss": "train/loss_step",
                                                                             "lr": "train/lr_step"})
        epochs = [{**r, "step": r["epoch"]} for r in _csv_rows(root / "plots/train" / f"{name}.csv")]
        t.log_rows(epochs, {k: k.replace("_", "/", 1) for k in (epochs[0] if epochs else {}) if k not in ("epoch",
                                                                                                        "step")})
        for kind in ("train", "eval"):
            f = root / "metrics" / kind / f"{name}.json"
            if f.is_file():
                values = {k: v for k, v in json.loads(f.read_text()).items() if isinstance(v, (int, float))}
                t.log_metrics(values, step=len(epochs))
        t.end()
        if t.enabled:
            done.append(name)
    return done


if __name__ == "__main__":
    import argparse

    from rsb.config import load_params

    parser = argparse.ArgumentParser(description="MLflow helpers")
    parser.add_argument("command", choices=["backfill"])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    names = backfill(load_params(args.params).experiment)
    print(f"back-filled {len(names)} run(s) into {redact(tracking_uri())}: {', '.join(names) or 'none needed'}")
