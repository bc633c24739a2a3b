"""The recipe/architecture paradox (paper fig. 8): A2 against DeiT's T2 on ResNet-50 and DeiT-S."""

from __future__ import annotations

import math
from pathlib import Path

from rsb.config import ConfigError
from rsb.io import read_json, write_csv, write_text
from rsb.outputs import Outputs
from rsb.studies.common import binomial_se, caption, fmt, published, pyplot, read, save, sources, table


def procedures_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """One row per (arch, recipe) of the procedures study: our val / V2 top-1 and the published val top-1."""
    paper = {(r["arch"], r["recipe"]): r for r in published("paper_procedures.csv")}
    out = []
    for arch in models:
        for recipe in recipes:
            o = Outputs.of(arch, recipe, study="procedures", root=root)
            ev = read(o.eval_metrics) or {}
            ema = read(o.ema_dir / "ema.json") or {}
            ref = paper.get((arch, recipe), {})
            out.append(
                {
                    "arch": arch,
                    "recipe": recipe,
                    "val_top1": ev.get("val/top1"),
                    "v2_top1": ev.get("v2/top1"),
                    "val_count": ev.get("val/count"),
                    "crop_pct": (ev.get("transform") or {}).get("crop_pct"),
                    "paper_val_top1": float(ref["val_top1"]) if ref.get("val_top1") else None,
                    "paper_source": ref.get("source"),
                    "ema_val_top1": ev.get("ema/val/top1"),  # the model EMA (T2: DeiT's --model-ema)
                    "ema_v2_top1": ev.get("ema/v2/top1"),
                    "ema_decay_per_update": ema.get("decay_per_update"),
                    "ema_updates": ema.get("updates"),
                }
            )
    return out


TIE = "tie"


def winners(rows: list[dict], key: str) -> dict[str, str | None]:
    """recipe -> the architecture with the best `key` under it; None if a cell is missing; TIE when the lead is
    within two standard errors of the difference of two binomial top-1s on the split (where its size is known):
    at the mini scale most gaps are."""
    out: dict[str, str | None] = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        cells = [r for r in rows if r["recipe"] == recipe]
        if any(r[key] is None for r in cells):
            out[recipe] = None
            continue
        ranked = sorted(cells, key=lambda r: r[key], reverse=True)
        first = ranked[0]
        if len(ranked) < 2:
            out[recipe] = first["arch"]
            continue
        second = ranked[1]
        sa, sb = binomial_se(first[key], first.get("val_count")), binomial_se(second[key], second.get("val_count"))
        noise = None if sa is None or sb is None else 2 * math.hypot(sa, sb)
        out[recipe] = TIE if noise is not None and first[key] - second[key] < noise else first["arch"]
    return out


def procedures_markdown(rows: list[dict], caption: str) -> str:
    models, recipes, cell = table(rows, "arch", "recipe")
    lines = [
        "# Comparing architectures and procedures: the paradox (the paper's figure 8)",
        "",
        caption,
        "",
        "ImageNet-val top-1 (%), ours (published; empty: not published in a source we could verify). Each model "
        "is evaluated with its recipe's transform: resize to size / crop_pct, bicubic, centre crop, the model's "
        "own mean/std (crop_pct 0.95 for A2, 0.875 for T2 as DeiT evaluates).",
        "",
        "| arch | " + " | ".join(recipes) + " |",
        "|---" * (len(recipes) + 1) + "|",
    ]
    for arch in models:
        lines.append(
            f"| {arch} | "
            + " | ".join(
                f"{fmt(cell[arch, rc]['val_top1'])} ({fmt(cell[arch, rc]['paper_val_top1'], 1)})" for rc in recipes
            )
            + " |"
        )
    ours, paper = winners(rows, "val_top1"), winners(rows, "paper_val_top1")

    def verdict(w: dict) -> str:
        if any(v is None for v in w.values()):
            return "undecided (a cell is missing)"
        said = "; ".join(
            f"under {rc} a tie within noise" if arch == TIE else f"under {rc} {arch} wins" for rc, arch in w.items()
        )
        if TIE in w.values():
            return said + ": no ordering to compare (a lead under two binomial standard errors is noise)"
        return said + (": **the ordering flips**" if len(set(w.values())) > 1 else ": the same architecture wins")

    lines += ["", f"Ours: {verdict(ours)}.", f"Published: {verdict(paper)}.", "", *ema_lines(rows), sources(rows)]
    return "\n".join(lines) + "\n"


def ema_lines(rows: list[dict]) -> list[str]:
    """The model EMA beside the model, for the recipes that keep one (T2)."""
    kept = [r for r in rows if r.get("ema_decay_per_update") is not None]
    if not kept:
        return []
    lines = [
        "## With and without the model EMA (DeiT's --model-ema)",
        "",
        "The table above, and the comparison with the published number, is the model's: DeiT's main.py evaluates "
        "`model` after each epoch and reports that, and only saves `model_ema` (timm's ModelEma, updated after each "
        "optimizer step, never fed back into training). The EMA is evaluated the same way beside it. Its decay is "
        "DeiT's 0.99996 per update of the paper's 187,500 updates, rescaled so that its horizon 1/(1 - decay) is the "
        "same fraction of this run (decay ** (187,500 / this run's updates)).",
        "",
        "| arch | recipe | val top-1, model | val top-1, EMA | V2 top-1, model | V2 top-1, EMA | EMA decay per update "
        "(updates) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in kept:
        lines.append(
            f"| {r['arch']} | {r['recipe']} | {fmt(r['val_top1'])} | {fmt(r['ema_val_top1'])} | {fmt(r['v2_top1'])} "
            f"| {fmt(r['ema_v2_top1'])} | {r['ema_decay_per_update']:.6g} ({r['ema_updates']}) |"
        )
    return [*lines, ""]


def procedures_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    models, recipes, cell = table(rows, "arch", "recipe")
    for arch in models:
        ax.plot(recipes, [cell[arch, rc]["val_top1"] for rc in recipes], marker="o", label=f"{arch} (ours)")
    ax.set(xlabel="training procedure", ylabel="val top-1 (%)", title="architecture x procedure (fig. 8)")
    ax.legend(fontsize=7)
    save(fig, path, caption)


def report(params, out: Path) -> tuple[dict, list[str]]:
    pr = params.procedures
    rows = procedures_rows(list(pr.models), list(pr.recipes))
    if all(r["val_top1"] is None for r in rows):
        raise ConfigError(
            "studies/procedures/metrics/eval: no (procedures.models x procedures.recipes) pair is "
            "evaluated; run `dvc repro studies/dvc.yaml:procedures-report`"
        )
    text = caption(params)
    write_text(out / "procedures.md", procedures_markdown(rows, text))
    write_csv(out / "procedures.csv", rows)
    procedures_plot(rows, out / "procedures.png", text)
    metrics = {f"procedures/{r['arch']}-{r['recipe']}_val_top1": r["val_top1"] for r in rows}
    metrics.update(
        {
            f"procedures/{r['arch']}-{r['recipe']}_ema_val_top1": r["ema_val_top1"]
            for r in rows
            if r["ema_val_top1"] is not None
        }
    )
    flips = winners(rows, "val_top1")
    if None not in flips.values() and TIE not in flips.values():
        metrics["procedures/ordering_flips"] = float(len(set(flips.values())) > 1)
    runs = [
        read_json(o.run_file).get("run_id")
        for arch in pr.models
        for rc in pr.recipes
        if (o := Outputs.of(arch, rc, study="procedures")).run_file.is_file()
    ]
    return metrics, [r for r in runs if r]
