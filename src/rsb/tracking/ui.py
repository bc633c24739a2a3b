"""The MLflow UI over this project's store: `mlflow ui` on 127.0.0.1 as a process group, the links that open the
runs table and a Compare view in the model-training view, and headless-Chromium screenshots of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from rsb.net import check_port, free_port
from rsb.tracking.store import ML_VIEW, TrackingError, experiment_id, tracking_uri

CHROMIUM = [
    "chromium",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1600,1400",
    "--virtual-time-budget=30000",
]


def compare_url(base: str, client, experiment: str, arch: str) -> tuple[str, list]:
    """The UI's Compare view of one architecture's workspace training runs (A1, A2, A3, ...)."""
    exp_id = experiment_id(client, experiment)
    runs = client.search_runs(
        [exp_id],
        f"tags.`rsb.arch` = '{arch}' and tags.`rsb.kind` = 'train' and "
        "tags.`rsb.dvc_exp` = 'workspace' and tags.`rsb.study` = 'grid'",
        order_by=["tags.`rsb.recipe` ASC"],
    )
    ids = [r.info.run_id for r in runs]
    return (
        f"{base}/#/compare-runs?runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([exp_id]))}&{ML_VIEW}",
        runs,
    )


def runs_url(base: str, client, experiment: str) -> str:
    """The experiment's runs table, in the UI's model-training view."""
    return f"{base}/#/experiments/{experiment_id(client, experiment)}/runs?{ML_VIEW}"


class UI:
    """`mlflow ui` on 127.0.0.1 over this project's store (or the tracking server itself, when it is one)."""

    def __init__(self, port: int = 0, quiet: bool = True):
        self.port, self.quiet = port, quiet

    def __enter__(self) -> str:
        self.proc, uri = None, tracking_uri()
        if uri.startswith("http"):
            return uri.rstrip("/")
        if self.port:
            check_port(self.port, "127.0.0.1", "--port")
        port = self.port or free_port()
        out = subprocess.DEVNULL if self.quiet else None
        # its own process group: MLflow 3 starts uvicorn workers and a job runner (huey consumers) that outlive a
        # terminated `mlflow ui`, so __exit__ stops the whole group
        self.proc = subprocess.Popen(
            ["mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            if self.proc.poll() is not None:
                raise TrackingError(
                    f"mlflow ui on port {port} exited ({self.proc.returncode}) before answering; is the "
                    "port in use? (--port)"
                )
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                return base
            except OSError:
                time.sleep(0.5)
        raise TrackingError(f"mlflow ui did not answer on {base} within 2 minutes; see its output above")

    def wait(self) -> None:
        """Serve until Ctrl-C or SIGTERM (a tracking server serves itself: nothing to wait for)."""

        def stop(*_):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        try:
            if self.proc is not None:
                self.proc.wait()
        except KeyboardInterrupt:
            pass

    def __exit__(self, *exc) -> None:
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
    if shutil.which("chromium") is None:
        raise FileNotFoundError("chromium is not installed: `apt-get install chromium` (Debian's package)")
    with tempfile.TemporaryDirectory() as profile:
        extra = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        out = subprocess.run(
            [*CHROMIUM, f"--user-data-dir={profile}", *extra, url], capture_output=True, text=True, timeout=180
        )
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-500:]}")
    return out.stdout


def screenshot(experiment: str, arch: str, out: Path) -> list:
    """Start the MLflow UI, open the Compare view of `arch`'s recipes, save a PNG; returns the runs compared."""
    with UI() as base:
        url, runs = compare_url(base, MlflowClient(tracking_uri()), experiment, arch)
        if not runs:
            raise ValueError(f"no workspace training runs of {arch!r} in experiment {experiment!r}; run dvc repro")
        out.parent.mkdir(parents=True, exist_ok=True)
        chromium(url, screenshot=out)
    return runs
