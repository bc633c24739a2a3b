"""The seed study (paper figs. 5-6): one recipe trained with many seeds; mean, std, extremes per split, val/V2
correlation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsb.config import ConfigError
from rsb.io import write_csv, write_text
from rsb.outputs import Outputs
from rsb.studies.common import (
    SPLIT_NAMES,
    SPLITS,
    binomial_se,
    caption,
    fmt,
    mean_std,
    pearson,
    published,
    pyplot,
    read,
    save,
)


def seed_rows(arch: str, recipe: str, seeds: list[int], root: Path = Path(".")) -> list[dict]:
    """One row per seed of the study: its final val / ReaL / V2 top-1 (None where not evaluated) and MLflow run."""
    out = []
    for seed in seeds:
        o = Outputs.of(arch, recipe, study="seeds", seed=seed, root=root)
        ev, run = read(o.eval_metrics) or {}, read(o.run_file) or {}
        out.append(
            {
                "seed": seed,
                **{s: ev.get(f"{s}/top1") for s in SPLITS},
                **{f"{s}_count": ev.get(f"{s}/count") for s in SPLITS},
                "run_id": run.get("run_id"),
                "train_s": (read(o.train_metrics) or {}).get("train/wall_s"),
            }
        )
    return out


def summarize(rows: list[dict]) -> dict:
    """Per split: n, mean, std, min, max and the seed of the max (the first seed on a tie); the val/V2 correlation
    over the seeds evaluated on both; the seeds with no evaluation."""
    out: dict[str, Any] = {"splits": {}, "seeds": len(rows), "missing": [r["seed"] for r in rows if r["val"] is None]}
    for s in SPLITS:
        have = [r for r in rows if r[s] is not None]
        vals = [r[s] for r in have]
        mean, std = mean_std(vals)
        best = max(have, key=lambda r: r[s]) if have else None
        count = next((r.get(f"{s}_count") for r in have if r.get(f"{s}_count")), None)
        out["splits"][s] = {
            "n": len(vals),
            "mean": mean,
            "std": std,
            "min": min(vals, default=None),
            "max": max(vals, default=None),
            "seed_of_max": best["seed"] if best else None,
            "images": count,
            "binomial_se": binomial_se(mean, count),
        }
    pairs = [r for r in rows if r["val"] is not None and r["v2"] is not None]
    out["pearson_val_v2"] = pearson([r["val"] for r in pairs], [r["v2"] for r in pairs])
    return out


def seeds_paper() -> dict[str, dict]:
    """split -> {statistic: (value, source)} from rsb/reference/paper_seeds.csv."""
    out: dict[str, dict] = {}
    for row in published("paper_seeds.csv"):
        value = float(row["value"]) if row["value"] is not None else None
        out.setdefault(row["split"], {})[row["statistic"]] = (value, row["source"])
    return out


def seeds_table(summary: dict) -> list[dict]:
    """The CSV: one row per split, ours beside the paper's published statistics (empty where none is published)."""
    paper, out = seeds_paper(), []
    for s in SPLITS:
        ours, ref = summary["splits"][s], paper.get(s, {})
        out.append(
            {
                "split": s,
                **ours,
                **{f"paper_{k}": ref.get(k, (None, None))[0] for k in ("mean", "std", "min", "max")},
                "paper_source": "; ".join(sorted({src for _, src in ref.values() if src})),
            }
        )
    return out


def seeds_markdown(arch: str, recipe: str, rows: list[dict], summary: dict, caption: str) -> str:
    table = seeds_table(summary)
    lines = [
        f"# Seed study: {arch} {recipe} (the paper's figures 5 and 6)",
        "",
        caption,
        "",
        f"{summary['seeds']} seeds ({', '.join(str(r['seed']) for r in rows)}); evaluated: "
        f"{summary['seeds'] - len(summary['missing'])}"
        + (
            f"; **not evaluated: {', '.join(map(str, summary['missing']))}** (left out of the statistics)"
            if summary["missing"]
            else ""
        )
        + ". Top-1 (%) of each seed's final model; std is the sample std (n-1).",
        "",
        "| split | n | mean | std | min | max | seed of max | images | binomial s.e. | paper mean | paper std |",
        "|---" * 11 + "|",
    ]
    for t in table:
        lines.append(
            f"| {SPLIT_NAMES[t['split']]} | {t['n']} | {fmt(t['mean'])} | {fmt(t['std'], 3)} | {fmt(t['min'])} | "
            f"{fmt(t['max'])} | {fmt(t['seed_of_max'])} | {fmt(t['images'])} | {fmt(t['binomial_se'], 3)} | "
            f"{fmt(t['paper_mean'])} | {fmt(t['paper_std'], 2)} |"
        )
    r = summary["pearson_val_v2"]
    best_val, best_v2 = summary["splits"]["val"]["seed_of_max"], summary["splits"]["v2"]["seed_of_max"]
    lines += [
        "",
        "binomial s.e. = sqrt(p(1-p)/N) at the mean top-1: the spread if each seed's errors fell on "
        "independent images of the split. Seeds share most of their errors, so a std below it is expected (the "
        "paper's 0.1 / 0.23 against 0.18 / 0.47 on ImageNet-val / V2 at 80% / 68%); a std near it means the "
        "seeds disagree on about as many images as independent models would.",
        "",
        f"Pearson correlation of val and V2 top-1 across seeds: {fmt(r, 3) or 'undefined (fewer than 3 seeds)'}"
        " (the paper: a limited correlation, no coefficient published).",
        f"Best seed on val: {fmt(best_val)}; on V2: {fmt(best_v2)}"
        + (
            " (the same seed)"
            if best_val == best_v2 and best_val is not None
            else " (different seeds, as in the paper)"
            if best_val is not None
            else ""
        )
        + ".",
        "",
        "Paper values: "
        + ("; ".join(sorted({t["paper_source"] for t in table if t["paper_source"]})) or "none")
        + " (rsb/reference/README.md).",
        "",
        "| seed | val | ReaL | V2 | MLflow run |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['seed']} | {fmt(r['val'])} | {fmt(r['real'])} | {fmt(r['v2'])} | {r['run_id'] or ''} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def seeds_plot(rows: list[dict], summary: dict, path: Path, caption: str) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    pairs = [r for r in rows if r["val"] is not None and r["v2"] is not None]
    a.scatter([r["val"] for r in pairs], [r["v2"] for r in pairs])
    for r in pairs:
        a.annotate(str(r["seed"]), (r["val"], r["v2"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    r = summary["pearson_val_v2"]
    a.set(
        xlabel="ImageNet-val top-1 (%)",
        ylabel="ImageNetV2 top-1 (%)",
        title=f"val vs V2 per seed (fig. 5), r = {fmt(r, 2) or 'n/a'}",
    )
    vals = [r["val"] for r in rows if r["val"] is not None]
    b.hist(vals, bins=max(3, min(20, len(vals))))
    s = summary["splits"]["val"]
    b.yaxis.get_major_locator().set_params(integer=True)
    b.set(
        xlabel="ImageNet-val top-1 (%)",
        ylabel="seeds",
        title=f"val top-1 over {s['n']} seeds (fig. 6): std {fmt(s['std'], 3) or 'n/a'}",
    )
    save(fig, path, caption)


def report(params, out: Path) -> tuple[dict, list[str]]:
    s = params.seeds
    rows = seed_rows(s.arch, s.recipe, list(s.seeds))
    if all(r["val"] is None for r in rows):
        raise ConfigError(
            f"studies/seeds/metrics/eval: no seed of {s.arch}-{s.recipe} is evaluated; run "
            "`dvc repro studies/dvc.yaml:seeds-report`"
        )
    summary = summarize(rows)
    text = caption(params)
    write_text(out / "seeds.md", seeds_markdown(s.arch, s.recipe, rows, summary, text))
    write_csv(out / "seeds.csv", seeds_table(summary))
    seeds_plot(rows, summary, out / "seeds.png", text)
    metrics = {
        f"seeds/{split}_{k}": v
        for split, st in summary["splits"].items()
        for k, v in st.items()
        if k in ("mean", "std", "min", "max", "n") and v is not None
    }
    metrics.update({"seeds/pearson_val_v2": summary["pearson_val_v2"], "seeds/missing": len(summary["missing"])})
    return metrics, [r["run_id"] for r in rows if r["run_id"]]
