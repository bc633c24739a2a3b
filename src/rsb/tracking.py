"""The one logging sink: MLflow on rank 0, a no-op elsewhere and in unit tests.

Store: MLFLOW_TRACKING_URI when set, else `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`,
where <project> is the repository that `dvc exp run --temp/--queue` copied from (they run under
<project>/.dvc/tmp/exps/...), so every run of the project lands in one store.

Tracking never stops training: if the server is down or dies mid-run, the first failed call disables the tracker
with one warning, every number still lands in the DVC outputs, and `python -m rsb.tracking backfill` logs them later.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import warnings
from pathlib import Path

from rsb.errors import RsbError
from rsb.io import read_json

EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
# From the first call on, in this process and the `mlflow ui` it starts: no usage report sent to MLflow's telemetry
# endpoint (MLflow 3's documented switch; a cluster without internet sees no stray timeouts), and an unreachable
# server costs seconds, not the minutes of MLflow's default 7 retries with exponential backoff.
NETWORK = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
for _k, _v in NETWORK.items():
    os.environ.setdefault(_k, _v)


class TrackingError(RsbError):
    """The MLflow store a command needs cannot be reached or refuses the request."""


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


def digest(value) -> str:
    """A short stable hash of a params section (dataclass or dict): the `rsb.params_hash` tag."""
    import dataclasses
    import hashlib
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_key(stage: str, path: Path) -> str:
    """`rsb.output_digest` of a run that logs one DVC output: how backfill knows the output is already logged."""
    return f"{stage}:{digest(Path(path).read_text())}"


def provenance(stage: str, params_hash: str, prepared: Path | None = None) -> dict:
    """The tags that lead an MLflow run back to its code, params and data: git commit, DVC experiment, stage, params
    hash and the prepared data's content digest (prepare's info.json)."""
    info = Path(prepared) / "info.json" if prepared else None
    data = "none (synthetic input)" if info is None else \
        read_json(info).get("digest", "unknown") if info.is_file() else "unknown"
    return {"rsb.stage": stage, "rsb.params_hash": params_hash, "rsb.data_digest": data,
            "rsb.dvc_exp": os.environ.get("DVC_EXP_NAME") or "workspace", "mlflow.source.git.commit": git_commit()}


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
    def log_model(self, model, name: str, arch: str, recipe: str, example, metrics: dict) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...


class MlflowTracker(Tracker):
    def __init__(self, experiment: str, run_name: str, run_id: str | None = None, tags: dict | None = None,
                 system_metrics: bool = True):
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
            warnings.warn(f"MLflow at {redact(self.uri)} failed ({type(e).__name__}: {redact(str(e))[:200]}); "
                          "tracking is off for the rest of this run. Every number is in the DVC outputs; log them "
                          "later with `python -m rsb.tracking backfill`", RuntimeWarning, stacklevel=3)

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

    def log_datasets(self, datasets: list[dict], context: str) -> None:
        self._safe(log_datasets, self.client, self.run_id, datasets, context)

    def log_model(self, model, name: str, arch: str, recipe: str, example, metrics: dict) -> None:
        self._safe(log_model, self, model, name, arch, recipe, example, metrics)

    def end(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # noqa: BLE001
                pass
        self._safe(self.client.set_terminated, self.run_id, status)


KIND = {"mlflow.experimentKind": "custom_model_development"}  # a model-training experiment, not a GenAI one
# MLflow 3.17's UI does not read that tag (its workflow switch is always on and defaults to GenAI); the workflow type
# in the link is what opens the runs table in a browser that never chose "Model training".
ML_VIEW = "workflowType=machine_learning"


def experiment_id(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") != KIND["mlflow.experimentKind"]:
            client.set_experiment_tag(exp.experiment_id, *next(iter(KIND.items())))
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=(project_root() / "mlartifacts").as_uri(), tags=KIND)
    except Exception:  # noqa: BLE001 - a concurrent run created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def start(main_process: bool, experiment: str, run_name: str, run_id: str | None = None,
          tags: dict | None = None) -> Tracker:
    if not main_process or os.environ.get("RSB_TRACKING") == "off":
        return Tracker()
    exp = os.environ.get("DVC_EXP_NAME")  # runs of several experiments stay apart in the UI's Compare view
    return MlflowTracker(experiment, f"{run_name} @{exp}" if exp else run_name, run_id, tags)


def study_run(experiment: str, study: str, label: str, metrics: dict, files: list[Path], children: list[str],
              params_hash: str, prepared: Path | None) -> str | None:
    """A study as one parent run: its report files as artifacts, its summary numbers as metrics, and the trainings
    it summarized re-parented under it (`mlflow.parentRunId`, which the UI nests by). Each report makes a new parent,
    so two studies compare side by side; a training belongs to the newest study that used it (`rsb.children` keeps
    every study's own list)."""
    t = start(True, experiment, f"study {study}: {label}", None,
              {**provenance(f"studies/dvc.yaml:{study}", params_hash, prepared), "rsb.kind": "study",
               "rsb.study": study, "rsb.children": ",".join(children)})
    t.log_metrics(metrics)
    for f in files:
        t.log_artifact(f, "report")
    if isinstance(t, MlflowTracker):
        for run_id in children:
            t._safe(t.client.set_tag, run_id, "mlflow.parentRunId", t.run_id)
    t.end()
    return getattr(t, "run_id", None)


def datasets(prepared: Path, source: str, splits: tuple[str, ...]) -> list[dict]:
    """MLflow dataset inputs for splits of the prepared data: name, source (data.raw), the content digest, counts."""
    info = read_json(Path(prepared) / "info.json")
    names = {"train": "train", "val": "val", "real": "val (ReaL labels)", "v2": "ImageNetV2 matched-frequency"}
    return [{"name": f"{info['source']} {names[s]}", "source": source, "digest": info["digest"][:16],
             "profile": {"images": info["images"]["val" if s == "real" else s], "scored": info["real_scored"]}
             if s == "real" else {"images": info["images"][s], "classes": info["classes"]}} for s in splits]


def log_datasets(client, run_id: str, items: list[dict], context: str) -> None:
    """Each item as a dataset input of the run (the UI's Datasets column; `datasets.digest` in searches)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [DatasetInput(Dataset(name=d["name"], digest=d["digest"], source_type="local",
                                   source=json.dumps({"uri": d["source"]}), profile=json.dumps(d["profile"])),
                           [InputTag("mlflow.data.context", context)]) for d in items]
    client.log_inputs(run_id, datasets=inputs)


def model_alias(recipe: str, exp: str | None) -> str:
    """`a1` for the workspace's model, `a1-<experiment>` for a DVC experiment's (never the workspace's alias)."""
    return recipe if not exp else re.sub(r"[^\w-]", "_", f"{recipe}-{exp}")


def promote(arch: str, recipe: str, exp: str) -> str:
    """Move the workspace alias `rsb-<arch>@<recipe>` to DVC experiment `exp`'s model; returns its version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client, registered = MlflowClient(tracking_uri()), f"rsb-{arch}"
    try:
        version = client.get_model_version_by_alias(registered, model_alias(recipe, exp)).version
    except MlflowException as e:
        raise ValueError(f"no model {registered}@{model_alias(recipe, exp)} in {redact(tracking_uri())}: did "
                         f"experiment {exp!r} train {arch}-{recipe}? (`dvc exp show`)") from e
    client.set_registered_model_alias(registered, recipe, version)
    return str(version)


def log_model(t: "MlflowTracker", model, name: str, arch: str, recipe: str, example, metrics: dict) -> None:
    """The trained network as an MLflow model of its training run (MLflow 3's LoggedModel, signature and input
    example at the test size), the eval metrics logged against it, registered as `rsb-<arch>` with the alias
    `<recipe>` (workspace runs) or `<recipe>-<experiment>` (DVC experiments): one version per trained model."""
    import time

    import mlflow
    import mlflow.pytorch
    import timm
    import torch
    from mlflow.entities import Metric
    from mlflow.models import infer_signature

    registered, exp = f"rsb-{arch}", os.environ.get("DVC_EXP_NAME")
    alias = model_alias(recipe, exp)
    found = t.client.search_model_versions(f"name = '{registered}' and run_id = '{t.run_id}'")
    if found:  # this training run's model is registered already (evaluate reran, or backfill)
        version = max(found, key=lambda v: int(v.version))
    else:
        mlflow.set_tracking_uri(t.uri)
        model = model.eval().cpu()
        with torch.no_grad():
            signature = infer_signature(example.numpy(), model(example).numpy())
        with mlflow.start_run(run_id=t.run_id):
            info = mlflow.pytorch.log_model(model, name=name, signature=signature, input_example=example.numpy(),
                                            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}",
                                                              f"timm=={timm.__version__}"],
                                            registered_model_name=registered, await_registration_for=60,
                                            serialization_format="pickle")  # any batch size, eager timm
        ts = int(time.time() * 1000)
        t.client.log_batch(t.run_id, [Metric(k, float(v), ts, 0, model_id=info.model_id)
                                      for k, v in metrics.items()])
        version = t.client.get_model_version(registered, str(info.registered_model_version))
        t.client.set_model_version_tag(registered, version.version, "rsb.recipe", recipe)
        t.client.set_model_version_tag(registered, version.version, "rsb.dvc_exp", exp or "workspace")
    t.client.set_registered_model_alias(registered, alias, version.version)


CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--window-size=1600,1400", "--virtual-time-budget=30000"]


def compare_url(base: str, client, experiment: str, arch: str) -> tuple[str, list]:
    """The UI's Compare view of one architecture's workspace training runs (A1, A2, A3, ...)."""
    from urllib.parse import quote

    exp_id = experiment_id(client, experiment)
    runs = client.search_runs([exp_id], f"tags.`rsb.arch` = '{arch}' and tags.`rsb.kind` = 'train' and "
                                        "tags.`rsb.dvc_exp` = 'workspace' and tags.`rsb.study` = 'grid'",
                              order_by=["tags.`rsb.recipe` ASC"])
    ids = [r.info.run_id for r in runs]
    return (f"{base}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([exp_id]))}&{ML_VIEW}",
            runs)


def runs_url(base: str, client, experiment: str) -> str:
    """The experiment's runs table, in the UI's model-training view."""
    return f"{base}/#/experiments/{experiment_id(client, experiment)}/runs?{ML_VIEW}"


class UI:
    """`mlflow ui` on 127.0.0.1 over this project's store (or the tracking server itself, when it is one)."""

    def __init__(self, port: int = 0, quiet: bool = True):
        self.port, self.quiet = port, quiet

    def __enter__(self) -> str:
        import time
        import urllib.request

        from rsb.launch import check_port, free_port

        self.proc, uri = None, tracking_uri()
        if uri.startswith("http"):
            return uri.rstrip("/")
        if self.port:
            check_port(self.port, "127.0.0.1", "--port")
        port = self.port or free_port()
        out = subprocess.DEVNULL if self.quiet else None
        # its own process group: MLflow 3 starts uvicorn workers and a job runner (huey consumers) that outlive a
        # terminated `mlflow ui`, so __exit__ stops the whole group
        self.proc = subprocess.Popen(["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
                                      str(port)], stdout=out, stderr=out, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if self.proc.poll() is not None:
                raise TrackingError(f"mlflow ui on port {port} exited ({self.proc.returncode}) before answering; is the "
                                    "port in use? (--port)")
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                return base
            except OSError:
                time.sleep(0.5)
        raise TrackingError(f"mlflow ui did not answer on {base} within 2 minutes; see its output above")

    def wait(self) -> None:
        """Serve until Ctrl-C or SIGTERM (a tracking server serves itself: nothing to wait for)."""
        import signal

        def stop(*_):
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, stop)
        try:
            if self.proc is not None:
                self.proc.wait()
        except KeyboardInterrupt:
            pass

    def __exit__(self, *exc) -> None:
        import signal

        if self.proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the group, then whatever of it is left
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def chromium(url: str, screenshot: Path | None = None) -> str:
    """Headless Chromium (Debian's `chromium` package): the rendered DOM, or a PNG screenshot of the page."""
    import shutil
    import tempfile

    if shutil.which("chromium") is None:
        raise FileNotFoundError("chromium is not installed: `apt-get install chromium` (Debian's package)")
    with tempfile.TemporaryDirectory() as profile:
        extra = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        out = subprocess.run([*CHROMIUM, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True,
                             timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-500:]}")
    return out.stdout


def screenshot(experiment: str, arch: str, out: Path) -> list:
    """Start the MLflow UI, open the Compare view of `arch`'s recipes, save a PNG; returns the runs compared."""
    from mlflow.tracking import MlflowClient

    with UI() as base:
        url, runs = compare_url(base, MlflowClient(tracking_uri()), experiment, arch)
        if not runs:
            raise ValueError(f"no workspace training runs of {arch!r} in experiment {experiment!r}; run dvc repro")
        out.parent.mkdir(parents=True, exist_ok=True)
        chromium(url, screenshot=out)
    return runs


def _csv_rows(path: Path) -> list[dict]:
    import csv

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
            last = max((m.step for m in t.client.get_metric_history(t.run_id, name)), default=-1) \
                if name in run.data.metrics else -1
            t.log_rows([r for r in rows if r["step"] > last], {key: name})


def _train_series(root: Path, name: str) -> list[tuple[list[dict], dict[str, str]]]:
    updates = _csv_rows(root / "plots/train" / f"{name}.updates.csv")
    epochs = [{**r, "step": r["epoch"]} for r in _csv_rows(root / "plots/train" / f"{name}.csv")]
    keys = {k: k.replace("_", "/", 1) for k in (epochs[0] if epochs else {}) if k not in ("epoch", "step")}
    final = [{**_numbers(root / "metrics" / kind / f"{name}.json"), "step": len(epochs)} for kind in ("train", "eval")]
    return [(updates, {"loss": "train/loss_step", "lr": "train/lr_step"}), (epochs, keys),
            *[([row], {k: k for k in row if k != "step"}) for row in final]]


def backfill(experiment: str, root: Path = Path("."), prepared: Path | None = None) -> list[str]:
    """Log the DVC outputs into the current store wherever MLflow lacks them (the server was down, or died mid-run):
    each trained model's run (runs/<name>.json) gets its missing params, per-update and per-epoch metrics, final
    train and eval metrics, and is marked FINISHED (studies/<study>/runs/ too); a run that never reached the store is created, tagged
    `rsb.backfill_of`. Benchmarks without a run get one. Idempotent: a second call logs nothing."""
    from mlflow.tracking import MlflowClient

    from rsb.config import flatten

    client = MlflowClient(tracking_uri())
    exp_id, done = experiment_id(client, experiment), []
    studies = sorted(d for d in (root / "studies").glob("*") if d.is_dir())
    for run_file in [f for r in (root, *studies) for f in sorted((r / "runs").glob("*.json"))]:
        name, info, where = run_file.stem, read_json(run_file), run_file.parent.parent
        key = info.get("run_id") or f"{name}:{info.get('resolved', {}).get('digest', '')}"
        run_id = _existing(client, exp_id, info.get("run_id"), key)
        before = _snapshot(client, run_id) if run_id else None
        t = MlflowTracker(experiment, name, run_id, {} if run_id else {**info.get("tags", {}), "rsb.backfill_of": key},
                          system_metrics=False)
        _fill(t, flatten(info.get("resolved", {})), _train_series(where, name))
        if where == root:  # the grid's models are registered; a study's replicas are not (as evaluate does)
            _register(t, root, name, info.get("resolved", {}), prepared)
        t.end()
        if t.enabled and _snapshot(client, t.run_id) != before:
            done.append(name)
    for f in sorted((root / "metrics/benchmark").glob("*.json")):
        key = output_key(f"benchmark@{f.stem}", f)
        if not client.search_runs([exp_id], f"tags.`rsb.output_digest` = '{key}'"):
            t = MlflowTracker(experiment, f"benchmark-{f.stem}", None, {"rsb.stage": f"benchmark@{f.stem}",
                              "rsb.kind": "benchmark", "rsb.output_digest": key, "rsb.backfill_of": key},
                              system_metrics=False)
            t.log_metrics({f"bench/{k}": v for k, v in _numbers(f).items()})
            t.end()
            done.append(f"benchmark@{f.stem}")
    return done


def _register(t: MlflowTracker, root: Path, name: str, resolved: dict, prepared: Path | None) -> None:
    """An evaluated model that the store has no version of (the server was down at evaluate) is logged and
    registered; one that has a version is left alone."""
    import timm
    import torch

    from rsb.io import load_weights

    weights, evaluated = root / "models" / f"{name}.safetensors", root / "metrics/eval" / f"{name}.json"
    if not (weights.is_file() and evaluated.is_file() and prepared and resolved):
        return
    classes = len(read_json(Path(prepared) / "classes.json"))
    model = timm.create_model(resolved["arch"], num_classes=classes)
    model.load_state_dict(load_weights(weights))
    size = resolved["test_img_size"]
    metrics = {k: v for k, v in _numbers(evaluated).items() if k.endswith(("top1", "top5"))}
    t.log_model(model, name, resolved["arch"], resolved["recipe_name"], torch.zeros(1, 3, size, size), metrics)


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


def main(argv: list[str] | None = None) -> None:
    import argparse

    from rsb.config import load_params

    parser = argparse.ArgumentParser(description="MLflow helpers")
    parser.add_argument("command", choices=["ui", "backfill", "screenshot", "promote"],
                        help="ui: `mlflow ui` on this project's store, printing the runs table's link; promote: move "
                             "rsb-<arch>@<recipe> to DVC experiment --exp's model")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--arch", default="resnet50", help="screenshot/promote: the architecture")
    parser.add_argument("--recipe", help="promote: the recipe whose alias moves")
    parser.add_argument("--exp", help="promote: the DVC experiment whose model the alias moves to")
    parser.add_argument("--port", type=int, default=5000, help="ui: the port on 127.0.0.1")
    parser.add_argument("--out", type=Path, default=Path("docs/mlflow-compare.png"))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    if args.command == "promote" and not (args.recipe and args.exp):
        parser.error("promote needs --recipe and --exp (e.g. --arch resnet50 --recipe a3 --exp lr6)")
    from mlflow.exceptions import MlflowException

    try:
        _command(args, params)
    except MlflowException as e:
        first = redact(str(e)).splitlines()[0][:200]
        raise TrackingError(f"MLflow at {redact(tracking_uri())}: {first}; start the server (mlflow server --host "
                            "127.0.0.1 ...) or point MLFLOW_TRACKING_URI at one") from None


def _command(args, params) -> None:
    if args.command == "ui":
        from mlflow.tracking import MlflowClient

        ui = UI(args.port, quiet=False)
        with ui as base:
            url = runs_url(base, MlflowClient(tracking_uri()), params.experiment)
            print(f"MLflow UI on {redact(tracking_uri())}, experiment {params.experiment!r}: {url}", flush=True)
            ui.wait()
    elif args.command == "promote":
        try:
            version = promote(args.arch, args.recipe, args.exp)
        except ValueError as e:
            raise TrackingError(str(e)) from None
        print(f"rsb-{args.arch}@{args.recipe} -> version {version} (experiment {args.exp})")
    elif args.command == "screenshot":
        compared = screenshot(params.experiment, args.arch, args.out)
        print(f"{args.out}: Compare view of {', '.join(r.info.run_name for r in compared)}")
    else:
        names = backfill(params.experiment, prepared=Path(params.data.prepared))
        print(f"back-filled {len(names)} run(s) into {redact(tracking_uri())}: {', '.join(names) or 'none needed'}")


if __name__ == "__main__":
    from rsb import errors

    errors.run(main)
