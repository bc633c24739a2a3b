"""Where runs go and what leads back from them: the store's URI, the project root, redaction, provenance tags, the
experiment. No MLflow import here (rsb.tracking sets MLflow's network settings before any is made).

Store: MLFLOW_TRACKING_URI when set, else `sqlite:///<project>/mlflow.db` with artifacts in `<project>/mlartifacts`,
where <project> is the repository that `dvc exp run --temp/--queue` copied from (they run under
<project>/.dvc/tmp/exps/...), so every run of the project lands in one store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

from rsb.errors import RsbError
from rsb.io import read_json


class TrackingError(RsbError):
    """The MLflow store a command needs cannot be reached or refuses the request."""


EXPS_MARKER = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def project_root(cwd: Path | None = None) -> Path:
    here = str((cwd or Path.cwd()).resolve())
    return Path(here.split(EXPS_MARKER)[0]) if EXPS_MARKER in here else Path(here)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def redact(uri: str) -> str:
    """Credentials in a tracking URI (user:password@host) never reach logs or output."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def git_commit(cwd: Path | None = None) -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def digest(value) -> str:
    """A short stable hash of a params section (dataclass or dict): the `rsb.params_hash` tag."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_key(stage: str, path: Path) -> str:
    """`rsb.output_digest` of a run that logs one DVC output: how backfill knows the output is already logged."""
    return f"{stage}:{digest(Path(path).read_text())}"


def provenance(stage: str, params_hash: str, prepared: Path | None = None) -> dict:
    """The tags that lead an MLflow run back to its code, params and data: git commit, DVC experiment, stage, params
    hash and the prepared data's content digest (prepare's info.json)."""
    info = Path(prepared) / "info.json" if prepared else None
    data = (
        "none (synthetic input)"
        if info is None
        else read_json(info).get("digest", "unknown")
        if info.is_file()
        else "unknown"
    )
    return {
        "rsb.stage": stage,
        "rsb.params_hash": params_hash,
        "rsb.data_digest": data,
        "rsb.dvc_exp": os.environ.get("DVC_EXP_NAME") or "workspace",
        "mlflow.source.git.commit": git_commit(),
    }


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
