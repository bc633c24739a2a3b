"""The recipes across architectures (paper fig. 3): val top-1 of every (model, recipe) pair."""

from __future__ import annotations

from pathlib import Path

from rsb.config import ConfigError
from rsb.io import read_json, write_csv, write_text
from rsb.outputs import Outputs
from rsb.report import reference
from rsb.studies.common import caption, fmt, pyplot, read, save


def architecture_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """Per arch: val top-1 under each recipe, ours and timm's published weights (rsb_timm_results.csv); the best
    recipe on each side; the stage seconds this arch cost here (training + evaluation)."""
    ref, out = reference(), []
    for arch in models:
        row: dict = {"arch": arch, "train_s": 0.0}
        for recipe in recipes:
            o = Outputs.of(arch, recipe, root=root)
            ev, tr = read(o.eval_metrics) or {}, read(o.train_metrics) or {}
            paper = ref.get((arch, recipe), {}).get("val_top1")
            row[recipe] = ev.get("val/top1")
            row[f"{recipe}_paper"] = float(paper) if paper else None
            row["train_s"] += (tr.get("train/stage_s") or 0.0) + (ev.get("eval_s") or 0.0)
        for side, suffix in (("best", ""), ("best_paper", "_paper")):
            have = {rc: row[f"{rc}{suffix}"] for rc in recipes if row[f"{rc}{suffix}"] is not None}
            row[side] = max(have, key=have.__getitem__) if have else None
        out.append(row)
    return out


def architectures_markdown(rows: list[dict], recipes: list[str], caption: str) -> str:
    head = " | ".join(f"{rc} (published)" for rc in recipes)
    lines = [
        "# Recipes across architectures (the paper's figure 3)",
        "",
        caption,
        "",
        "ImageNet-val top-1 (%) of each architecture under each recipe, ours (published: the timm weights the "
        "authors released, rsb/reference/rsb_timm_results.csv; empty: not published). *stage seconds*: the train "
        "and evaluate stages of this architecture in this run, after their start-up (each stage also spends "
        "~10 s importing torch, timm and DeepSpeed on 2 cores): about what adding it to `models` costs.",
        "",
        f"| arch | {head} | best recipe (published) | stage seconds |",
        "|---" * (len(recipes) + 3) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{fmt(r[rc])} ({fmt(r[f'{rc}_paper'])})" for rc in recipes)
        lines.append(
            f"| {r['arch']} | {cells} | {r['best'] or ''} ({r['best_paper'] or ''}) | {fmt(r['train_s'], 0)} |"
        )
    differ = sorted({r["best_paper"] for r in rows if r["best_paper"]})
    lines += [
        "",
        "Best recipe per architecture, published: "
        + (
            ", ".join(f"{r['arch']} {r['best_paper']}" for r in rows if r["best_paper"])
            or "none of these architectures"
        )
        + (" (not the same recipe for all: the recipes are not universal)" if len(differ) > 1 else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def architectures_plot(rows: list[dict], recipes: list[str], path: Path, caption: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(recipes))
    for ax, suffix, title in ((axes[0], "", "ours"), (axes[1], "_paper", "published (timm weights)")):
        for i, rc in enumerate(recipes):
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [r[f"{rc}{suffix}"] or 0 for r in rows], width, label=rc)
        ax.set_xticks(
            [j + width * (len(recipes) - 1) / 2 for j in range(len(rows))],
            [r["arch"] for r in rows],
            rotation=30,
            fontsize=7,
        )
        ax.set(ylabel="val top-1 (%)", title=title)
        ax.legend(fontsize=7)
    save(fig, path, caption)


def report(params, out: Path) -> tuple[dict, list[str]]:
    rows = architecture_rows(list(params.models), list(params.run))
    if all(r[rc] is None for r in rows for rc in params.run):
        raise ConfigError("metrics/eval: no evaluated (models x run) pair; run `dvc repro` first")
    text = caption(params)
    write_text(out / "architectures.md", architectures_markdown(rows, list(params.run), text))
    write_csv(out / "architectures.csv", rows)
    architectures_plot(rows, list(params.run), out / "architectures.png", text)
    metrics = {f"architectures/{r['arch']}-{rc}_val_top1": r[rc] for r in rows for rc in params.run}
    runs = [
        read_json(o.run_file).get("run_id")
        for arch in params.models
        for rc in params.run
        if (o := Outputs.of(arch, rc)).run_file.is_file()
    ]
    return metrics, [r for r in runs if r]
