"""The model registry: each grid model registered as `rsb-<arch>`, aliased by recipe (and DVC experiment)."""

from __future__ import annotations

import os
import re
import time

import mlflow
import mlflow.pytorch
import timm
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from rsb.tracking.runs import MlflowTracker, Tracker
from rsb.tracking.store import redact, tracking_uri


def model_alias(recipe: str, exp: str | None) -> str:
    """`a1` for the workspace's model, `a1-<experiment>` for a DVC experiment's (never the workspace's alias)."""
    return recipe if not exp else re.sub(r"[^\w-]", "_", f"{recipe}-{exp}")


def promote(arch: str, recipe: str, exp: str) -> str:
    """Move the workspace alias `rsb-<arch>@<recipe>` to DVC experiment `exp`'s model; returns its version."""
    client, registered = MlflowClient(tracking_uri()), f"rsb-{arch}"
    try:
        version = client.get_model_version_by_alias(registered, model_alias(recipe, exp)).version
    except MlflowException as e:
        raise ValueError(
            f"no model {registered}@{model_alias(recipe, exp)} in {redact(tracking_uri())}: did "
            f"experiment {exp!r} train {arch}-{recipe}? (`dvc exp show`)"
        ) from e
    client.set_registered_model_alias(registered, recipe, version)
    return str(version)


def log_model(t: Tracker, model, name: str, arch: str, recipe: str, example, metrics: dict) -> None:
    """The trained network as an MLflow model of its training run (MLflow 3's LoggedModel, signature and input
    example at the test size), the eval metrics logged against it, registered as `rsb-<arch>` with the alias
    `<recipe>` (workspace runs) or `<recipe>-<experiment>` (DVC experiments): one version per trained model."""
    if isinstance(t, MlflowTracker):
        t.safe(_log_model, t, model, name, arch, recipe, example, metrics)


def _log_model(t: MlflowTracker, model, name: str, arch: str, recipe: str, example, metrics: dict) -> None:
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
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                signature=signature,
                input_example=example.numpy(),
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"],
                registered_model_name=registered,
                await_registration_for=60,
                serialization_format="pickle",
            )  # any batch size, eager timm
        ts = int(time.time() * 1000)
        t.client.log_batch(t.run_id, [Metric(k, float(v), ts, 0, model_id=info.model_id) for k, v in metrics.items()])
        version = t.client.get_model_version(registered, str(info.registered_model_version))
        t.client.set_model_version_tag(registered, version.version, "rsb.recipe", recipe)
        t.client.set_model_version_tag(registered, version.version, "rsb.dvc_exp", exp or "workspace")
    t.client.set_registered_model_alias(registered, alias, version.version)
