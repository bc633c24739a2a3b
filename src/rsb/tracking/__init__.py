"""The one logging sink of the project, MLflow, one module per concern:

    store     where runs go (the project's store, or MLFLOW_TRACKING_URI), provenance tags, the experiment
    runs      a run's logging: MLflow on rank 0, a no-op elsewhere; an outage never stops training
    registry  the trained models registered as rsb-<arch>@<recipe>; promote
    ui        `mlflow ui` on 127.0.0.1, the runs-table and Compare-view links, Chromium screenshots
    backfill  the DVC outputs logged where MLflow lacks them

`python -m rsb.tracking ui|backfill|screenshot|promote` (__main__). This package re-exports store and runs, the
part every stage uses.
"""

import os

# From the first call on, in this process and the `mlflow ui` it starts: no usage report sent to MLflow's telemetry
# endpoint (MLflow 3's documented switch; a cluster without internet sees no stray timeouts), and an unreachable
# server costs seconds, not the minutes of MLflow's default 7 retries with exponential backoff. The `mlflow ui` runs
# no GenAI job runner (MLflow 3 starts 8 huey processes for scorers and prompt optimisation by default: ~24 s of CPU
# and 1.9 GB at start, measured, and a store in /dev/shm left behind when stopped); nothing here submits jobs. A
# value the user set is kept. Set before any module of this package imports MLflow.
ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

from rsb.tracking.runs import MlflowTracker, Tracker, datasets, log_datasets, start, study_run  # noqa: E402
from rsb.tracking.store import (  # noqa: E402
    TrackingError,
    digest,
    experiment_id,
    output_key,
    project_root,
    provenance,
    redact,
    tracking_uri,
)

__all__ = [
    "ENV",
    "MlflowTracker",
    "Tracker",
    "TrackingError",
    "datasets",
    "digest",
    "experiment_id",
    "log_datasets",
    "output_key",
    "project_root",
    "provenance",
    "redact",
    "start",
    "study_run",
    "tracking_uri",
]
