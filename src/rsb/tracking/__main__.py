"""python -m rsb.tracking ui | backfill | screenshot | promote (README, "MLflow")."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from rsb import errors
from rsb.config import load_params
from rsb.tracking.backfill import backfill
from rsb.tracking.registry import promote
from rsb.tracking.store import TrackingError, redact, tracking_uri
from rsb.tracking.ui import UI, runs_url, screenshot


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="MLflow helpers")
    parser.add_argument(
        "command",
        choices=["ui", "backfill", "screenshot", "promote"],
        help="ui: `mlflow ui` on this project's store, printing the runs table's link; promote: move "
        "rsb-<arch>@<recipe> to DVC experiment --exp's model",
    )
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
    try:
        _command(args, params)
    except MlflowException as e:
        first = redact(str(e)).splitlines()[0][:200]
        raise TrackingError(
            f"MLflow at {redact(tracking_uri())}: {first}; start the server (mlflow server --host "
            "127.0.0.1 ...) or point MLFLOW_TRACKING_URI at one"
        ) from None


def _command(args, params) -> None:
    if args.command == "ui":
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
    errors.run(main)
