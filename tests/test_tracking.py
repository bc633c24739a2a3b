"""tracking: one store for every run of the project, credentials never shown, an outage never stops training."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from rsb import tracking
from rsb.distributed import free_port


def test_project_root_sees_through_dvc_temp_runs(tmp_path):
    inner = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    inner.mkdir(parents=True)
    assert tracking.project_root(inner) == tmp_path / "proj"
    assert tracking.project_root(tmp_path / "proj") == tmp_path / "proj"


def test_default_store_is_the_projects_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_credentials_are_redacted():
    assert tracking.redact("https://alice:s3cret@mlflow.example/x") == "https://***@mlflow.example/x"
    assert tracking.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_null_tracker_on_other_ranks():
    t = tracking.start(False, "rsb", "x")
    assert type(t) is tracking.Tracker and t.run_id is None
    t.log_metrics({"a": 1.0}, step=1)  # no-ops
    t.end()


def test_server_down_disables_tracking_with_one_warning(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:pw@127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = tracking.MlflowTracker("rsb", "x", system_metrics=False)
        t.log_metrics({"train/loss": 1.0}, step=1)
        t.end()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "tracking is off" in msgs[0] and "backfill" in msgs[0]
    assert "pw" not in msgs[0] and "***@127.0.0.1" in msgs[0]
    assert not t.enabled


def test_training_finishes_without_a_server_and_backfill_logs_it(tmp_path, prepared, monkeypatch):
    from mlflow.tracking import MlflowClient

    from conftest import write_params
    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    p = write_params(tmp_path / "params.yaml", prepared)
    with pytest.warns(RuntimeWarning, match="tracking is off"):
        metrics = main(["--arch", "test_resnet", "--recipe", "a3", "--params", str(p)])
    assert json.loads((tmp_path / "metrics/train/test_resnet-a3.json").read_text()) == metrics
    assert json.loads((tmp_path / "runs/test_resnet-a3.json").read_text())["run_id"] is None

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert tracking.backfill("rsb", Path(".")) == ["test_resnet-a3"]
    assert tracking.backfill("rsb", Path(".")) == [], "idempotent"
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("rsb").experiment_id])
    assert run.data.params["recipe.aa"] == "rand-m6-mstd0.5-inc1" and run.data.tags["rsb.stage"] == \
        "train@test_resnet-a3"
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) == metrics["updates"]
    assert run.data.metrics["train/loss"] == pytest.approx(metrics["train/loss"])
