"""tracking: one store for every run of the project, credentials never shown, an outage never stops training."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, clean_env

from rsb import tracking
from rsb.net import free_port
from rsb.tracking import ui as tracking_ui
from rsb.tracking.backfill import backfill


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
    from conftest import write_params
    from mlflow.tracking import MlflowClient

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
    assert backfill("rsb", Path(".")) == ["test_resnet-a3"]
    assert backfill("rsb", Path(".")) == [], "idempotent"
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("rsb").experiment_id])
    assert (
        run.data.params["recipe.aa"] == "rand-m6-mstd0.5-inc1" and run.data.tags["rsb.stage"] == "train@test_resnet-a3"
    )
    assert len(client.get_metric_history(run.info.run_id, "train/loss_step")) == metrics["updates"]
    assert run.data.metrics["train/loss"] == pytest.approx(metrics["train/loss"])


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 with its own sqlite store; `restart()` brings it back on the same port."""
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    procs = []

    def start():
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{store / 'mlflow.db'}",
                    "--artifacts-destination",
                    str(store / "artifacts"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=open(store / "server.log", "a"),
                env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no GenAI job runner (8 processes)
                start_new_session=True,
            )
        )  # the server runs uvicorn in a child: stop them together
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server did not start: {(store / 'server.log').read_text()[-2000:]}")

    def stop():
        os.killpg(procs[-1].pid, signal.SIGKILL)
        procs[-1].wait()

    start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", stop=stop, restart=start)
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _get(url: str, endpoint: str, **query) -> dict:
    """The REST API itself, as the MLflow UI reads it."""
    q = urllib.parse.urlencode(query)
    return json.loads(urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{q}", timeout=30).read())


@pytest.mark.slow
def test_runs_read_back_from_a_real_server(tmp_path, prepared, monkeypatch, mlflow_server):
    from conftest import write_params

    from stages.evaluate import main as evaluate
    from stages.train import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-exp")
    p = str(write_params(tmp_path / "params.yaml", prepared))
    metrics = train(["--arch", "test_resnet", "--recipe", "a3", "--params", p])
    ev = evaluate(["--arch", "test_resnet", "--recipe", "a3", "--params", p])
    run_id = json.loads((tmp_path / "runs/test_resnet-a3.json").read_text())["run_id"]

    run = _get(mlflow_server.url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "test_resnet-a3 @tidy-exp"
    params = {x["key"]: x["value"] for x in run["data"]["params"]}
    tags = {x["key"]: x["value"] for x in run["data"]["tags"]}
    values = {x["key"]: x["value"] for x in run["data"]["metrics"]}
    assert params["recipe.aa"] == "rand-m6-mstd0.5-inc1" and params["epochs"] == str(metrics["epochs"])
    assert tags["rsb.stage"] == "train@test_resnet-a3" and tags["rsb.dvc_exp"] == "tidy-exp"
    assert tags["rsb.data_digest"] == json.loads((prepared / "info.json").read_text())["digest"]
    assert len(tags["rsb.params_hash"]) == 16 and tags["mlflow.source.git.commit"]
    assert values["v2/top1"] == pytest.approx(ev["v2/top1"]) and values["train/loss"] == pytest.approx(
        metrics["train/loss"]
    )
    history = _get(mlflow_server.url, "metrics/get-history", run_id=run_id, metric_key="train/loss_step")
    assert len(history["metrics"]) == metrics["updates"]
    files = _get(mlflow_server.url, "artifacts/list", run_id=run_id, path="weights")["files"]
    assert [f["path"] for f in files] == ["weights/test_resnet-a3.safetensors"]  # proxied to the server's store


@pytest.mark.slow
def test_server_dying_mid_run_then_backfill_loses_nothing(tmp_path, prepared, mlflow_server):
    from conftest import write_params
    from mlflow.tracking import MlflowClient

    p = write_params(tmp_path / "params.yaml", prepared, {"scale.min_epochs": 20, "train.eval_every": 1})
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.train", "--arch", "test_resnet", "--recipe", "a3", "--params", str(p)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = MlflowClient(mlflow_server.url)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill the server once the first epoch is logged
        exp = client.get_experiment_by_name("rsb")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and "train/loss" in runs[0].data.metrics:
            break
        time.sleep(0.3)
    mlflow_server.stop()
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "tracking is off" in out and "backfill" in out
    metrics = json.loads((tmp_path / "metrics/train/test_resnet-a3.json").read_text())
    run_id = json.loads((tmp_path / "runs/test_resnet-a3.json").read_text())["run_id"]
    history = lambda key: [m.step for m in client.get_metric_history(run_id, key)]  # noqa: E731

    mlflow_server.restart()
    assert client.get_run(run_id).info.status == "RUNNING"
    assert len(history("train/loss")) < metrics["epochs"], "the server died before the run ended"
    out = subprocess.run(
        [sys.executable, "-m", "rsb.tracking", "backfill", "--params", str(p)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "back-filled 1 run(s)" in out.stdout, out.stdout + out.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["train/loss"] == pytest.approx(metrics["train/loss"])
    assert history("train/loss") == list(range(1, metrics["epochs"] + 1)), "every epoch once, none twice"
    assert sorted(history("train/loss_step")) == list(range(1, metrics["updates"] + 1))
    again = subprocess.run(
        [sys.executable, "-m", "rsb.tracking", "backfill", "--params", str(p)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "none needed" in again.stdout, again.stdout


# --- models as MLflow models, datasets as inputs, the UI ----------------------------------------------------------


def _train_and_evaluate(cwd: Path, prepared: Path, recipe: str = "a3") -> dict:
    from conftest import write_params

    from stages.evaluate import main as evaluate
    from stages.train import main as train

    os.chdir(cwd)
    p = str(write_params(cwd / "params.yaml", prepared))
    train(["--arch", "test_resnet", "--recipe", recipe, "--params", p])
    return evaluate(["--arch", "test_resnet", "--recipe", recipe, "--params", p])


def _predictions_equal_evaluates(model, cwd: Path, prepared: Path) -> None:
    """The registered model's top-5 on the whole val split equals the evaluate stage's, image for image."""
    import torch

    from rsb import loader as loaders
    from rsb.config import load_params, resolve
    from rsb.data.datasets import Split
    from rsb.engine import predict
    from rsb.models import load_model

    r = resolve(load_params(cwd / "params.yaml"), "test_resnet", "a3", world_size=1)
    ours = load_model("test_resnet", cwd / "models/test_resnet-a3.safetensors", 20)
    ds = Split(prepared, "val", loaders.eval_transform(r.test_img_size, r.recipe.crop_pct, ours))
    cpu = torch.device("cpu")
    a, _ = predict(ours, loaders.eval_loader(ds, 16, 0), cpu, None, channels_last=True)
    b, _ = predict(model, loaders.eval_loader(ds, 16, 0), cpu, None, channels_last=True)
    assert len(a) == len(ds) and torch.equal(a, b)


def test_each_trained_network_is_a_registered_mlflow_model(tmp_path, prepared, monkeypatch):
    """On a real sqlite store: the experiment is a model-training one; evaluate logs the network as an MLflow model
    of its training run (signature, input example at the test size), eval metrics against it, registered as
    rsb-<arch> with the recipe's alias; load-by-alias predicts like evaluate; training and eval data are dataset
    inputs with prepare's digest; evaluating again registers nothing new; an experiment gets its own version and
    alias without moving the workspace's."""
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    (tmp_path / "ws").mkdir()
    ev = _train_and_evaluate(tmp_path / "ws", prepared)
    client = MlflowClient(store)
    exp = client.get_experiment_by_name("rsb")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    v = client.get_model_version_by_alias("rsb-test_resnet", "a3")
    run_id = json.loads((tmp_path / "ws/runs/test_resnet-a3.json").read_text())["run_id"]
    assert v.run_id == run_id and v.tags["rsb.recipe"] == "a3" and v.tags["rsb.dvc_exp"] == "workspace"
    (logged,) = client.search_logged_models([exp.experiment_id])
    assert logged.source_run_id == run_id
    assert {m.key: m.value for m in logged.metrics}["val/top1"] == pytest.approx(ev["val/top1"])
    info = mlflow.models.get_model_info("models:/rsb-test_resnet@a3")
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:]) == (3, 32, 32)
    _predictions_equal_evaluates(mlflow.pytorch.load_model("models:/rsb-test_resnet@a3"), tmp_path / "ws", prepared)

    digest = json.loads((prepared / "info.json").read_text())["digest"][:16]
    inputs = {
        (i.dataset.name, tuple(t.value for t in i.tags))
        for i in client.get_run(run_id).inputs.dataset_inputs
        if i.dataset.digest == digest
    }
    assert inputs == {
        ("mini train", ("training",)),
        ("mini val", ("evaluation",)),
        ("mini val (ReaL labels)", ("evaluation",)),
        ("mini ImageNetV2 matched-frequency", ("evaluation",)),
    }

    from stages.evaluate import main as evaluate

    evaluate(["--arch", "test_resnet", "--recipe", "a3", "--params", str(tmp_path / "ws/params.yaml")])
    assert len(client.search_model_versions("name = 'rsb-test_resnet'")) == 1, "nothing new for the same model"

    monkeypatch.setenv("DVC_EXP_NAME", "lr6")
    (tmp_path / "exp").mkdir()
    _train_and_evaluate(tmp_path / "exp", prepared)
    assert client.get_model_version_by_alias("rsb-test_resnet", "a3").version == v.version, "workspace alias kept"
    assert client.get_model_version_by_alias("rsb-test_resnet", "a3-lr6").version != v.version


def test_backfill_registers_a_model_the_store_missed(tmp_path, prepared, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("RSB_TRACKING", "off")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    _train_and_evaluate(tmp_path, prepared)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.delenv("RSB_TRACKING")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    assert backfill("rsb", Path("."), prepared) == ["test_resnet-a3"]
    assert MlflowClient(store).get_model_version_by_alias("rsb-test_resnet", "a3").version in (1, "1")
    backfill("rsb", Path("."), prepared)
    assert len(MlflowClient(store).search_model_versions("name = 'rsb-test_resnet'")) == 1


@pytest.mark.slow
def test_load_by_alias_through_a_real_server(tmp_path, prepared, monkeypatch, mlflow_server):
    import mlflow
    import mlflow.pytorch

    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    _train_and_evaluate(tmp_path, prepared)
    mlflow.set_tracking_uri(mlflow_server.url)
    _predictions_equal_evaluates(mlflow.pytorch.load_model("models:/rsb-test_resnet@a3"), tmp_path, prepared)


def _page_text(url: str, wait_for: str) -> str:
    """The text of `url` in a fresh browser profile (nothing chosen before in the UI), once `wait_for` shows."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=tracking_ui.CHROMIUM[2:9])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(url)
        try:
            page.wait_for_selector(wait_for, timeout=60_000)
        finally:
            text = page.inner_text("body")
            browser.close()
    return text


def _compare_view_text(url: str) -> str:
    """The Compare view's text after scrolling each of its tables to the end, as a user would (they are virtualized:
    rows below a table's fold are not in the page until scrolled to). Playwright drives Debian's Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=tracking_ui.CHROMIUM[2:9])
        page = browser.new_page(viewport={"width": 1600, "height": 1200})
        page.goto(url)
        page.wait_for_selector("text=Comparing 3 Runs", timeout=60_000)
        seen = ""
        for _ in range(40):
            page.evaluate("""() => document.querySelectorAll('div').forEach(e => {
                if (e.scrollHeight > e.clientHeight + 5) e.scrollTop += 150; })""")
            page.wait_for_timeout(150)
            seen += page.inner_text("body")
        browser.close()
    return seen


@pytest.mark.slow
def test_the_compare_view_a_user_opens_shows_each_recipe(tmp_path, prepared, monkeypatch):
    """Headless Chromium on the MLflow UI (`mlflow ui` on 127.0.0.1): the Compare view of A1/A2/A3 shows the three
    runs and each one's val top-1; the experiment's runs table lists them; the screenshot script saves a PNG."""
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    tops = {recipe: _train_and_evaluate(tmp_path, prepared, recipe)["val/top1"] for recipe in ("a1", "a2", "a3")}
    client = MlflowClient(store)
    # the command a user runs: a fresh browser on the link it prints opens the runs table (not GenAI's overview)
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "rsb.tracking", "ui", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": ":".join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))},
    )
    try:
        line = next(line for line in ui.stdout if line.startswith("MLflow UI on "))  # mlflow ui logs there too
        url = re.search(r"http://127\.0\.0\.1:\d+/\S+", line).group(0)
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), line
        text = _page_text(url, "text=test_resnet-a1")
        assert all(f"test_resnet-{recipe}" in text for recipe in tops), text[:2000]
        # the Compare view and the screenshot script, through that UI (a tracking URI that is a server is used as
        # it is: no second `mlflow ui` starts, each costs ~20 s here)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        with tracking_ui.UI() as base:
            url, runs = tracking_ui.compare_url(base, client, "rsb", "test_resnet")
            assert [r.data.tags["rsb.recipe"] for r in runs] == ["a1", "a2", "a3"]
            compare = _compare_view_text(url)
            assert "Comparing 3 Runs" in compare and "val/top1" in compare
            for recipe, top1 in tops.items():
                assert f"test_resnet-{recipe}" in compare and f"{top1:g}" in compare, (recipe, top1)
        png = tmp_path / "compare.png"
        tracking_ui.screenshot("rsb", "test_resnet", png)
    finally:
        ui.terminate()
        ui.wait(timeout=60)
    left = subprocess.run(["pgrep", "-f", f"--port {port}"], capture_output=True, text=True).stdout.split()
    assert not left, f"mlflow ui processes outlived the command: {left}"
    assert png.read_bytes()[:4] == b"\x89PNG"
