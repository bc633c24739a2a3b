"""The paper's other results, from the stages' JSON outputs only: the seed study (fig. 5-6), training cost against
accuracy (fig. 1), the recipes across architectures (fig. 3), A2 vs T2 (fig. 8) and transfer learning (fig. 7).
Pure functions; `stages.studies` writes the files.

Statistics are taken at the end of training (the last epoch's model, as the paper's seed study), with the sample
standard deviation (n - 1); a statistic that n does not define (std of one seed, a correlation of fewer than three)
is None and shows as an empty cell, never as 0.
"""
from __future__ import annotations

import csv
import io
import math
from importlib.resources import files
from pathlib import Path

from rsb.io import atomic, read_json
from rsb.outputs import Outputs

SPLITS = ("val", "real", "v2")
SPLIT_NAMES = {"val": "ImageNet-val", "real": "ImageNet-ReaL", "v2": "ImageNetV2"}


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def published(name: str) -> list[dict]:
    """A CSV of rsb/reference (its README cites every number's source); empty cells become None."""
    text = files("rsb.reference").joinpath(name).read_text()
    return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


# --- seed study -----------------------------------------------------------------------------------------------------

def seed_rows(arch: str, recipe: str, seeds: list[int], root: Path = Path(".")) -> list[dict]:
    """One row per seed of the study: its final val / ReaL / V2 top-1 (None where not evaluated) and MLflow run."""
    out = []
    for seed in seeds:
        o = Outputs.of(arch, recipe, study="seeds", seed=seed, root=root)
        ev, run = _read(o.eval_metrics) or {}, _read(o.run_file) or {}
        out.append({"seed": seed, **{s: ev.get(f"{s}/top1") for s in SPLITS},
                    **{f"{s}_count": ev.get(f"{s}/count") for s in SPLITS}, "run_id": run.get("run_id"),
                    "train_s": (_read(o.train_metrics) or {}).get("train/wall_s")})
    return out


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def binomial_se(top1: float | None, images: int | None) -> float | None:
    """sqrt(p (1 - p) / N) in points: how much top-1 would spread if each seed's errors fell on independent images of
    a split of N. Seeds share most of their errors, so their std is expected below it."""
    if top1 is None or not images:
        return None
    p = top1 / 100
    return 100 * math.sqrt(p * (1 - p) / images)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r over paired values; None below three pairs (two always give +-1) or with a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"pearson: {len(xs)} x values against {len(ys)} y values")
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def summarize(rows: list[dict]) -> dict:
    """Per split: n, mean, std, min, max and the seed of the max (the first seed on a tie); the val/V2 correlation
    over the seeds evaluated on both; the seeds with no evaluation."""
    out = {"splits": {}, "seeds": len(rows), "missing": [r["seed"] for r in rows if r["val"] is None]}
    for s in SPLITS:
        have = [r for r in rows if r[s] is not None]
        vals = [r[s] for r in have]
        mean, std = mean_std(vals)
        best = max(have, key=lambda r: r[s]) if have else None
        count = next((r.get(f"{s}_count") for r in have if r.get(f"{s}_count")), None)
        out["splits"][s] = {"n": len(vals), "mean": mean, "std": std, "min": min(vals, default=None),
                            "max": max(vals, default=None), "seed_of_max": best["seed"] if best else None,
                            "images": count, "binomial_se": binomial_se(mean, count)}
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


def _f(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def seeds_table(summary: dict) -> list[dict]:
    """The CSV: one row per split, ours beside the paper's published statistics (empty where none is published)."""
    paper, out = seeds_paper(), []
    for s in SPLITS:
        ours, ref = summary["splits"][s], paper.get(s, {})
        out.append({"split": s, **ours, **{f"paper_{k}": ref.get(k, (None, None))[0]
                                           for k in ("mean", "std", "min", "max")},
                    "paper_source": "; ".join(sorted({src for _, src in ref.values() if src}))})
    return out


def seeds_markdown(arch: str, recipe: str, rows: list[dict], summary: dict, caption: str) -> str:
    table = seeds_table(summary)
    lines = [f"# Seed study: {arch} {recipe} (the paper's figures 5 and 6)", "", caption, "",
             f"{summary['seeds']} seeds ({', '.join(str(r['seed']) for r in rows)}); evaluated: "
             f"{summary['seeds'] - len(summary['missing'])}"
             + (f"; **not evaluated: {', '.join(map(str, summary['missing']))}** (left out of the statistics)"
                if summary["missing"] else "") + ". Top-1 (%) of each seed's final model; std is the sample std (n-1).",
             "", "| split | n | mean | std | min | max | seed of max | images | binomial s.e. | paper mean | paper std |",
             "|---" * 11 + "|"]
    for t in table:
        lines.append(f"| {SPLIT_NAMES[t['split']]} | {t['n']} | {_f(t['mean'])} | {_f(t['std'], 3)} | {_f(t['min'])} | "
                     f"{_f(t['max'])} | {_f(t['seed_of_max'])} | {_f(t['images'])} | {_f(t['binomial_se'], 3)} | "
                     f"{_f(t['paper_mean'])} | {_f(t['paper_std'], 2)} |")
    r = summary["pearson_val_v2"]
    best_val, best_v2 = summary["splits"]["val"]["seed_of_max"], summary["splits"]["v2"]["seed_of_max"]
    lines += ["", "binomial s.e. = sqrt(p(1-p)/N) at the mean top-1: the spread if each seed's errors fell on "
              "independent images of the split. Seeds share most of their errors, so a std below it is expected (the "
              "paper's 0.1 / 0.23 against 0.18 / 0.47 on ImageNet-val / V2 at 80% / 68%); a std near it means the "
              "seeds disagree on about as many images as independent models would.",
              "", f"Pearson correlation of val and V2 top-1 across seeds: {_f(r, 3) or 'undefined (fewer than 3 seeds)'}"
              " (the paper: a limited correlation, no coefficient published).",
              f"Best seed on val: {_f(best_val)}; on V2: {_f(best_v2)}"
              + (" (the same seed)" if best_val == best_v2 and best_val is not None else
                 " (different seeds, as in the paper)" if best_val is not None else "") + ".",
              "", "Paper values: " + ("; ".join(sorted({t["paper_source"] for t in table if t["paper_source"]}))
                                      or "none") + " (rsb/reference/README.md).",
              "", "| seed | val | ReaL | V2 | MLflow run |", "|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {_f(r['val'])} | {_f(r['real'])} | {_f(r['v2'])} | {r['run_id'] or ''} |" for r in rows]
    return "\n".join(lines) + "\n"


def seeds_plot(rows: list[dict], summary: dict, path: Path, caption: str) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    pairs = [r for r in rows if r["val"] is not None and r["v2"] is not None]
    a.scatter([r["val"] for r in pairs], [r["v2"] for r in pairs])
    for r in pairs:
        a.annotate(str(r["seed"]), (r["val"], r["v2"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    r = summary["pearson_val_v2"]
    a.set(xlabel="ImageNet-val top-1 (%)", ylabel="ImageNetV2 top-1 (%)",
          title=f"val vs V2 per seed (fig. 5), r = {_f(r, 2) or 'n/a'}")
    vals = [r["val"] for r in rows if r["val"] is not None]
    b.hist(vals, bins=max(3, min(20, len(vals))))
    s = summary["splits"]["val"]
    b.yaxis.get_major_locator().set_params(integer=True)
    b.set(xlabel="ImageNet-val top-1 (%)", ylabel="seeds",
          title=f"val top-1 over {s['n']} seeds (fig. 6): std {_f(s['std'], 3) or 'n/a'}")
    _save(fig, path, caption)


# --- cost against accuracy ------------------------------------------------------------------------------------------

def cost_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """Each trained (arch, recipe): devices, device kind, wall time of its epochs, device-hours, top-1."""
    out = []
    for arch in models:
        for recipe in recipes:
            o = Outputs.of(arch, recipe, root=root)
            tr, ev, run = _read(o.train_metrics), _read(o.eval_metrics) or {}, _read(o.run_file) or {}
            if tr is None:
                continue
            out.append({"arch": arch, "recipe": recipe, "epochs": tr.get("epochs"), "devices": tr.get("devices"),
                        "device": run.get("tags", {}).get("rsb.device"), "wall_h": _hours(tr.get("train/wall_s")),
                        "device_hours": tr.get("device_hours"), "val_top1": ev.get("val/top1"),
                        "v2_top1": ev.get("v2/top1")})
    return out


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def cost_paper() -> list[dict]:
    out = []
    for row in published("paper_costs.csv"):
        devices, hours = row["devices"], row["hours"]
        out.append({**row, "device_hours": float(devices) * float(hours) if devices and hours else None,
                    "val_top1": float(row["val_top1"]) if row["val_top1"] else None})
    return out


def cost_markdown(rows: list[dict], caption: str) -> str:
    lines = ["# Training cost against accuracy (the paper's figure 1)", "", caption, "",
             "Device-hours = devices x the wall time of the training epochs (training, BN sync and validation; not "
             "start-up or checkpoints).", "",
             "| arch | recipe | epochs | devices | device | wall (h) | device-hours | val top-1 | V2 top-1 |",
             "|---" * 9 + "|"]
    lines += [f"| {r['arch']} | {r['recipe']} | {_f(r['epochs'])} | {_f(r['devices'])} | {r['device'] or ''} | "
              f"{_f(r['wall_h'], 4)} | {_f(r['device_hours'], 4)} | {_f(r['val_top1'])} | {_f(r['v2_top1'])} |"
              for r in rows]
    lines += ["", "Published (ImageNet-1k, 224 px; empty: not published in a source we could verify):", "",
              "| arch | recipe | epochs | devices | device | wall (h) | device-hours | val top-1 | source |",
              "|---" * 9 + "|"]
    for p in cost_paper():
        lines.append(f"| {p['arch']} | {p['recipe']} | {p['epochs'] or ''} | {p['devices'] or ''} | {p['device'] or ''} "
                     f"| {p['hours'] or ''} | {_f(p['device_hours'], 1)} | {_f(p['val_top1'], 1)} | {p['source']} |")
    return "\n".join(lines) + "\n"


def cost_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in rows:
        if r["device_hours"] and r["val_top1"] is not None:
            a.scatter(r["device_hours"], r["val_top1"], label=f"{r['arch']}-{r['recipe']}")
    a.set(xscale="log", xlabel="device-hours (this run)", ylabel="val top-1 (%)", title="ours")
    a.legend(fontsize=7)
    for p in cost_paper():
        if p["device_hours"] and p["val_top1"] is not None:
            b.scatter(p["device_hours"], p["val_top1"], marker="x")
            b.annotate(f"{p['arch']} {p['recipe']}", (p["device_hours"], p["val_top1"]), fontsize=7)
    b.set(xscale="log", xlabel="GPU-hours (V100)", ylabel="val top-1 (%)", title="the paper (published)")
    _save(fig, path, caption)


# --- recipes across architectures -----------------------------------------------------------------------------------

def architecture_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """Per arch: val top-1 under each recipe, ours and timm's published weights (rsb_timm_results.csv); the best
    recipe on each side; the stage seconds this arch cost here (training + evaluation)."""
    from rsb.report import reference

    ref, out = reference(), []
    for arch in models:
        row: dict = {"arch": arch, "train_s": 0.0}
        for recipe in recipes:
            o = Outputs.of(arch, recipe, root=root)
            ev, tr = _read(o.eval_metrics) or {}, _read(o.train_metrics) or {}
            paper = ref.get((arch, recipe), {}).get("val_top1")
            row[recipe] = ev.get("val/top1")
            row[f"{recipe}_paper"] = float(paper) if paper else None
            row["train_s"] += (tr.get("train/stage_s") or 0.0) + (ev.get("eval_s") or 0.0)
        for side, suffix in (("best", ""), ("best_paper", "_paper")):
            have = {rc: row[f"{rc}{suffix}"] for rc in recipes if row[f"{rc}{suffix}"] is not None}
            row[side] = max(have, key=have.get) if have else None
        out.append(row)
    return out


def architectures_markdown(rows: list[dict], recipes: list[str], caption: str) -> str:
    head = " | ".join(f"{rc} (published)" for rc in recipes)
    lines = ["# Recipes across architectures (the paper's figure 3)", "", caption, "",
             "ImageNet-val top-1 (%) of each architecture under each recipe, ours (published: the timm weights the "
             "authors released, rsb/reference/rsb_timm_results.csv; empty: not published). *stage seconds*: the train "
             "and evaluate stages of this architecture in this run, after their start-up (each stage also spends "
             "~10 s importing torch, timm and DeepSpeed on 2 cores): about what adding it to `models` costs.", "",
             f"| arch | {head} | best recipe (published) | stage seconds |", "|---" * (len(recipes) + 3) + "|"]
    for r in rows:
        cells = " | ".join(f"{_f(r[rc])} ({_f(r[f'{rc}_paper'])})" for rc in recipes)
        lines.append(f"| {r['arch']} | {cells} | {r['best'] or ''} ({r['best_paper'] or ''}) | {_f(r['train_s'], 0)} |")
    differ = sorted({r["best_paper"] for r in rows if r["best_paper"]})
    lines += ["", "Best recipe per architecture, published: " + (", ".join(
        f"{r['arch']} {r['best_paper']}" for r in rows if r["best_paper"]) or "none of these architectures")
              + (" (not the same recipe for all: the recipes are not universal)" if len(differ) > 1 else "") + "."]
    return "\n".join(lines) + "\n"


def architectures_plot(rows: list[dict], recipes: list[str], path: Path, caption: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.8 / max(1, len(recipes))
    for ax, suffix, title in ((axes[0], "", "ours"), (axes[1], "_paper", "published (timm weights)")):
        for i, rc in enumerate(recipes):
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [r[f"{rc}{suffix}"] or 0 for r in rows], width, label=rc)
        ax.set_xticks([j + width * (len(recipes) - 1) / 2 for j in range(len(rows))], [r["arch"] for r in rows],
                      rotation=30, fontsize=7)
        ax.set(ylabel="val top-1 (%)", title=title)
        ax.legend(fontsize=7)
    _save(fig, path, caption)


# --- the recipe/architecture paradox ---------------------------------------------------------------------------------

def procedures_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """One row per (arch, recipe) of the procedures study: our val / V2 top-1 and the published val top-1."""
    paper = {(r["arch"], r["recipe"]): r for r in published("paper_procedures.csv")}
    out = []
    for arch in models:
        for recipe in recipes:
            ev = _read(Outputs.of(arch, recipe, study="procedures", root=root).eval_metrics) or {}
            ref = paper.get((arch, recipe), {})
            out.append({"arch": arch, "recipe": recipe, "val_top1": ev.get("val/top1"), "v2_top1": ev.get("v2/top1"),
                        "val_count": ev.get("val/count"),
                        "crop_pct": (ev.get("transform") or {}).get("crop_pct"),
                        "paper_val_top1": float(ref["val_top1"]) if ref.get("val_top1") else None,
                        "paper_source": ref.get("source")})
    return out


TIE = "tie"


def winners(rows: list[dict], key: str) -> dict[str, str | None]:
    """recipe -> the architecture with the best `key` under it; None if a cell is missing; TIE when the lead is
    within two standard errors of the difference of two binomial top-1s on the split (where its size is known):
    at the mini scale most gaps are."""
    out = {}
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        cells = [r for r in rows if r["recipe"] == recipe]
        if any(r[key] is None for r in cells):
            out[recipe] = None
            continue
        first, second = sorted(cells, key=lambda r: r[key], reverse=True)[:2] if len(cells) > 1 else (cells[0], None)
        noise = None
        if second is not None and first.get("val_count") and second.get("val_count"):
            noise = 2 * math.hypot(binomial_se(first[key], first["val_count"]),
                                   binomial_se(second[key], second["val_count"]))
        out[recipe] = TIE if noise is not None and first[key] - second[key] < noise else first["arch"]
    return out


def procedures_markdown(rows: list[dict], caption: str) -> str:
    models, recipes, cell = _table(rows, "arch", "recipe")
    lines = ["# Comparing architectures and procedures: the paradox (the paper's figure 8)", "", caption, "",
             "ImageNet-val top-1 (%), ours (published; empty: not published in a source we could verify). Each model "
             "is evaluated with its recipe's transform: resize to size / crop_pct, bicubic, centre crop, the model's "
             "own mean/std (crop_pct 0.95 for A2, 0.875 for T2 as DeiT evaluates).", "",
             "| arch | " + " | ".join(recipes) + " |", "|---" * (len(recipes) + 1) + "|"]
    for arch in models:
        lines.append(f"| {arch} | " + " | ".join(
            f"{_f(cell[arch, rc]['val_top1'])} ({_f(cell[arch, rc]['paper_val_top1'], 1)})" for rc in recipes) + " |")
    ours, paper = winners(rows, "val_top1"), winners(rows, "paper_val_top1")

    def verdict(w: dict) -> str:
        if any(v is None for v in w.values()):
            return "undecided (a cell is missing)"
        said = "; ".join(f"under {rc} a tie within noise" if arch == TIE else f"under {rc} {arch} wins"
                         for rc, arch in w.items())
        if TIE in w.values():
            return said + ": no ordering to compare (a lead under two binomial standard errors is noise)"
        return said + (": **the ordering flips**" if len(set(w.values())) > 1 else ": the same architecture wins")
    lines += ["", f"Ours: {verdict(ours)}.", f"Published: {verdict(paper)}.",
              "", _sources(rows)]
    return "\n".join(lines) + "\n"


def procedures_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    models, recipes, cell = _table(rows, "arch", "recipe")
    for arch in models:
        ax.plot(recipes, [cell[arch, rc]["val_top1"] for rc in recipes], marker="o", label=f"{arch} (ours)")
    ax.set(xlabel="training procedure", ylabel="val top-1 (%)", title="architecture x procedure (fig. 8)")
    ax.legend(fontsize=7)
    _save(fig, path, caption)


# --- transfer learning ----------------------------------------------------------------------------------------------

def transfer_rows(arch: str, starts: list[str], datasets: list[str], root: Path = Path(".")) -> list[dict]:
    """One row per (start, dataset): the fine-tune's downstream val top-1 and its val size, the start's ImageNet-val
    top-1 (ours: the final val top-1 of its training, where the start is one of the grid's models; published: the
    paper's)."""
    paper = {r["start"]: r for r in published("paper_transfer.csv")}
    out = []
    for start in starts:
        ours_imagenet = (_read(Outputs.of(arch, start, root=root).train_metrics) or {}).get("val/top1")
        for dataset in datasets:
            o = Outputs.finetune(arch, start, dataset, root=root)
            m, run = _read(o.train_metrics) or {}, _read(o.run_file) or {}
            ref = paper.get(start, {})
            out.append({"start": start, "dataset": dataset, "top1": m.get("val/top1"), "count": m.get("val/count"),
                        "train_s": m.get("train/wall_s"), "imagenet_top1": ours_imagenet,
                        "paper_imagenet_top1": float(ref["imagenet_val_top1"]) if ref.get("imagenet_val_top1") else None,
                        "paper_top1": float(ref["downstream_top1"]) if ref.get("downstream_top1") else None,
                        "paper_source": ref.get("source"), "run_id": run.get("run_id")})
    return out


def _noise(a: dict, b: dict) -> float | None:
    """Two standard errors of the difference of two binomial top-1s (None where a split size is unknown)."""
    if not (a.get("count") and b.get("count")) or a["top1"] is None or b["top1"] is None:
        return None
    return 2 * math.hypot(binomial_se(a["top1"], a["count"]), binomial_se(b["top1"], b["count"]))


def transfer_summary(rows: list[dict], scratch: str = "scratch") -> dict:
    """Per start: the mean downstream top-1 over the datasets it has all of (None otherwise), its rank; per dataset:
    the best pretrained start's lead over `scratch`, and whether that lead exceeds the noise (two binomial s.e.)."""
    starts, datasets, cell = _table(rows, "start", "dataset")
    means = {}
    for st in starts:
        vals = [cell[st, d]["top1"] for d in datasets]
        means[st] = None if None in vals else sum(vals) / len(vals)
    ranked = sorted((st for st in starts if means[st] is not None), key=lambda st: means[st], reverse=True)
    ses = {}  # binomial s.e. of each start's mean over the datasets (None where a val size is unknown)
    for st in ranked:
        parts = [binomial_se(cell[st, d]["top1"], cell[st, d]["count"]) for d in datasets]
        ses[st] = None if None in parts else math.sqrt(sum(x * x for x in parts)) / len(parts)
    # between neighbours in the ranking: ">" when the lead exceeds two s.e. of the difference, else "~" (noise)
    gaps = [">" if ses[a] is None or ses[b] is None or means[a] - means[b] > 2 * math.hypot(ses[a], ses[b]) else "~"
            for a, b in zip(ranked, ranked[1:])]
    lead = {}
    for d in datasets:
        pre = [cell[st, d] for st in starts if st != scratch and cell[st, d]["top1"] is not None]
        base = cell.get((scratch, d))
        if not pre or base is None or base["top1"] is None:
            lead[d] = None
            continue
        best = max(pre, key=lambda r: r["top1"])
        noise = _noise(best, base)
        lead[d] = {"start": best["start"], "points": best["top1"] - base["top1"], "noise": noise,
                   "beyond_noise": noise is not None and best["top1"] - base["top1"] > noise}
    return {"means": means, "ranked": ranked, "gaps": gaps, "lead_over_scratch": lead}


def transfer_markdown(rows: list[dict], summary: dict, recipe: str, caption: str) -> str:
    starts, datasets, cell = _table(rows, "start", "dataset")
    first = {r["start"]: r for r in rows}
    lines = ["# Transfer learning: one fine-tuning procedure from each pretraining (the paper's figure 7)", "",
             caption, "",
             f"Downstream val top-1 (%) after fine-tuning with `recipes.{recipe}` (the same procedure for every start "
             "and dataset; not the paper's hyperparameters, which no source we hold gives). ImageNet-val: the start's "
             "top-1 on this run's ImageNet at the end of its training (ours; empty for a start not trained here) and "
             "as published. Published downstream numbers are empty: the "
             "figure's values are not in a source we could verify.", "",
             "| start | ImageNet-val ours (published) | " + " | ".join(datasets) + " | mean |",
             "|---" * (len(datasets) + 3) + "|"]
    for st in starts:
        lines.append(f"| {st} | {_f(first[st]['imagenet_top1'])} ({_f(first[st]['paper_imagenet_top1'], 2)}) | "
                     + " | ".join(_f(cell[st, d]["top1"]) for d in datasets) + f" | {_f(summary['means'][st])} |")
    lines += ["", "Val images per dataset: " + ", ".join(
        f"{d} {next((cell[st, d]['count'] for st in starts if cell[st, d]['count']), None) or '?'}" for d in datasets)
        + " (one binomial standard error at 50% top-1 is 50/sqrt(N) points)."]
    lines += ["", "## What the numbers say", ""]
    if summary["ranked"]:
        ranked = summary["ranked"]
        text = f"{ranked[0]} ({summary['means'][ranked[0]]:.2f})" + "".join(
            f" {g} {st} ({summary['means'][st]:.2f})" for g, st in zip(summary["gaps"], ranked[1:]))
        lines.append(f"Ranking by mean downstream top-1: {text} ('~': a lead under two binomial standard errors of "
                     "the difference, i.e. noise at this size).")
    for d, lead in summary["lead_over_scratch"].items():
        if lead is None:
            lines.append(f"- {d}: pretrained vs scratch undecided (a cell is missing or no scratch start).")
        else:
            verdict = "beyond noise" if lead["beyond_noise"] else "within noise (under two binomial s.e.)"
            lines.append(f"- {d}: the best pretrained start ({lead['start']}) leads scratch by {lead['points']:+.2f} "
                         f"points, {verdict}" + (f" (2 s.e. = {lead['noise']:.2f})" if lead["noise"] else "") + ".")
    lines += ["", "The paper's finding (fig. 7, qualitative): A1 transfers best; A2 and the PyTorch default are close "
              "downstream although A2 is much better on ImageNet-val and V2; A3 is clearly worse downstream (the "
              "paper relates this to its 160 px training resolution).",
              "", _sources(rows)]
    return "\n".join(lines) + "\n"


def transfer_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    starts, datasets, cell = _table(rows, "start", "dataset")
    width = 0.8 / max(1, len(starts))
    for i, st in enumerate(starts):
        xs = [j + (i - (len(starts) - 1) / 2) * width for j in range(len(datasets))]
        ys = [cell[st, d]["top1"] if cell[st, d]["top1"] is not None else 0 for d in datasets]
        ax.bar(xs, ys, width, label=st)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set(ylabel="downstream val top-1 (%)", title="fine-tuned from each start (fig. 7)")
    ax.legend(fontsize=7, title="start")
    _save(fig, path, caption)


def _table(rows: list[dict], a: str, b: str) -> tuple[list, list, dict]:
    """The row keys, the column keys (each in first-seen order) and the cells of a two-key table."""
    return (list(dict.fromkeys(r[a] for r in rows)), list(dict.fromkeys(r[b] for r in rows)),
            {(r[a], r[b]): r for r in rows})


def _sources(rows: list[dict]) -> str:
    return "Sources: " + "; ".join(sorted({r["paper_source"] for r in rows if r["paper_source"]})) + "."


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path, caption: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
