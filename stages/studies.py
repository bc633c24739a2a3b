"""The paper's studies beyond figure 4, as reports of studies/dvc.yaml (not part of the default `dvc repro`):

    python -m stages.studies seeds           reports/seeds.md, .csv, .png        (the seed study, paper fig. 5-6)
    python -m stages.studies cost            reports/cost.md, .csv, .png         (cost vs accuracy, fig. 1)
    python -m stages.studies architectures   reports/architectures.md, .csv, .png (recipes x architectures, fig. 3)
    python -m stages.studies procedures      reports/procedures.md, .csv, .png   (A2 vs T2 on two models, fig. 8)
    python -m stages.studies transfer        reports/transfer.md, .csv, .png     (fine-tuned from each start, fig. 7)

Each reads only the stages' JSON outputs (never MLflow), states its scale in its caption, and logs itself as one
MLflow parent run (`rsb.kind=study`) with the report files as artifacts and its summary numbers as metrics
(`seeds/val_std`, ...); the trainings it summarizes become that run's children, so the UI nests them and two studies
(before and after a change) compare side by side. A training run has one parent: the newest study that used it.

Results card: see BENCHMARKS.md (the study commands on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rsb import errors, studies
from rsb.config import load_params


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Build one study's report.")
    p.add_argument("study", choices=sorted(studies.STUDIES))
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    metrics = studies.build(load_params(args.params), args.study, args.out)
    print((args.out / f"{args.study}.md").read_text())
    return metrics


if __name__ == "__main__":
    errors.run(main)
