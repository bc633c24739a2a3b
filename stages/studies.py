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

from rsb import errors, studies, tracking
from rsb.config import ConfigError, load_params
from rsb.io import read_json, refuse_overlap, write_csv, write_text
from rsb.outputs import Outputs
from stages.report import scale_text


def _caption(params) -> str:
    info_file = Path(params.data.prepared) / "info.json"
    return scale_text(params, read_json(info_file) if info_file.is_file() else {})


def seeds(params, out: Path) -> tuple[dict, list[str]]:
    s = params.seeds
    rows = studies.seed_rows(s.arch, s.recipe, list(s.seeds))
    if all(r["val"] is None for r in rows):
        raise ConfigError(f"studies/seeds/metrics/eval: no seed of {s.arch}-{s.recipe} is evaluated; run "
                          "`dvc repro studies/dvc.yaml:seeds-report`")
    summary = studies.summarize(rows)
    text = _caption(params)
    write_text(out / "seeds.md", studies.seeds_markdown(s.arch, s.recipe, rows, summary, text))
    write_csv(out / "seeds.csv", studies.seeds_table(summary))
    studies.seeds_plot(rows, summary, out / "seeds.png", text)
    metrics = {f"seeds/{split}_{k}": v for split, st in summary["splits"].items()
               for k, v in st.items() if k in ("mean", "std", "min", "max", "n") and v is not None}
    metrics.update({"seeds/pearson_val_v2": summary["pearson_val_v2"], "seeds/missing": len(summary["missing"])})
    return metrics, [r["run_id"] for r in rows if r["run_id"]]


def cost(params, out: Path) -> tuple[dict, list[str]]:
    rows = studies.cost_rows(list(params.models), list(params.run))
    if not rows:
        raise ConfigError("metrics/train: no trained (models x run) pair; run `dvc repro` first")
    text = _caption(params)
    write_text(out / "cost.md", studies.cost_markdown(rows, text))
    write_csv(out / "cost.csv", rows)
    studies.cost_plot(rows, out / "cost.png", text)
    metrics = {f"cost/{r['arch']}-{r['recipe']}_device_hours": r["device_hours"] for r in rows}
    return metrics, []  # its trainings are the grid's, children of the architectures study


def architectures(params, out: Path) -> tuple[dict, list[str]]:
    rows = studies.architecture_rows(list(params.models), list(params.run))
    if all(r[rc] is None for r in rows for rc in params.run):
        raise ConfigError("metrics/eval: no evaluated (models x run) pair; run `dvc repro` first")
    text = _caption(params)
    write_text(out / "architectures.md", studies.architectures_markdown(rows, list(params.run), text))
    write_csv(out / "architectures.csv", rows)
    studies.architectures_plot(rows, list(params.run), out / "architectures.png", text)
    metrics = {f"architectures/{r['arch']}-{rc}_val_top1": r[rc] for r in rows for rc in params.run}
    runs = [read_json(o.run_file).get("run_id") for arch in params.models for rc in params.run
            if (o := Outputs.of(arch, rc)).run_file.is_file()]
    return metrics, [r for r in runs if r]


def procedures(params, out: Path) -> tuple[dict, list[str]]:
    pr = params.procedures
    rows = studies.procedures_rows(list(pr.models), list(pr.recipes))
    if all(r["val_top1"] is None for r in rows):
        raise ConfigError("studies/procedures/metrics/eval: no (procedures.models x procedures.recipes) pair is "
                          "evaluated; run `dvc repro studies/dvc.yaml:procedures-report`")
    text = _caption(params)
    write_text(out / "procedures.md", studies.procedures_markdown(rows, text))
    write_csv(out / "procedures.csv", rows)
    studies.procedures_plot(rows, out / "procedures.png", text)
    metrics = {f"procedures/{r['arch']}-{r['recipe']}_val_top1": r["val_top1"] for r in rows}
    flips = studies.winners(rows, "val_top1")
    if None not in flips.values() and studies.TIE not in flips.values():
        metrics["procedures/ordering_flips"] = float(len(set(flips.values())) > 1)
    runs = [read_json(o.run_file).get("run_id") for arch in pr.models for rc in pr.recipes
            if (o := Outputs.of(arch, rc, study="procedures")).run_file.is_file()]
    return metrics, [r for r in runs if r]


def transfer(params, out: Path) -> tuple[dict, list[str]]:
    tr = params.transfer
    rows = studies.transfer_rows(tr.arch, list(tr.starts), list(tr.datasets))
    if all(r["top1"] is None for r in rows):
        raise ConfigError("studies/transfer/metrics/train: no (transfer.starts x transfer.datasets) pair is "
                          "fine-tuned; run `dvc repro studies/dvc.yaml:transfer-report`")
    summary = studies.transfer_summary(rows)
    text = _caption(params) + (f" Fine-tuning: recipes.{tr.recipe} x epochs factor {tr.scale(params.scale).epochs}, "
                               f"lr factor {tr.scale(params.scale).lr_factor}.")
    write_text(out / "transfer.md", studies.transfer_markdown(rows, summary, tr.recipe, text))
    write_csv(out / "transfer.csv", rows)
    studies.transfer_plot(rows, out / "transfer.png", text)
    metrics = {f"transfer/{r['start']}-{r['dataset']}_top1": r["top1"] for r in rows}
    metrics.update({f"transfer/{st}_mean_top1": m for st, m in summary["means"].items()})
    return metrics, [r["run_id"] for r in rows if r["run_id"]]


STUDIES = {"seeds": seeds, "cost": cost, "architectures": architectures, "procedures": procedures,
           "transfer": transfer}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Build one study's report.")
    p.add_argument("study", choices=sorted(STUDIES))
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    params = load_params(args.params)
    refuse_overlap({"--out": args.out}, {"metrics": Path("metrics"), "studies": Path("studies"),
                                         "data.prepared": Path(params.data.prepared), "data.raw": Path(params.data.raw)})
    args.out.mkdir(parents=True, exist_ok=True)
    metrics, children = STUDIES[args.study](params, args.out)
    metrics = {k: float(v) for k, v in metrics.items() if v is not None}
    label = {"seeds": f"{params.seeds.arch}-{params.seeds.recipe}, {len(params.seeds.seeds)} seeds",
             "procedures": f"{' x '.join(params.procedures.models)} under {', '.join(params.procedures.recipes)}",
             "transfer": f"{params.transfer.arch} from {', '.join(params.transfer.starts)} to "
                         f"{', '.join(params.transfer.datasets)}"}.get(args.study, ", ".join(params.models))
    tracking.study_run(params.experiment, args.study, label, metrics, sorted(args.out.glob(f"{args.study}.*")),
                       children, tracking.digest(params), Path(params.data.prepared))
    print((args.out / f"{args.study}.md").read_text())
    return metrics


if __name__ == "__main__":
    errors.run(main)
