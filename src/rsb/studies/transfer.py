"""Transfer learning (paper fig. 7): downstream top-1 of each start on each dataset."""

from __future__ import annotations

import math
from pathlib import Path

from rsb.config import ConfigError
from rsb.io import write_csv, write_text
from rsb.outputs import Outputs
from rsb.studies.common import binomial_se, caption, fmt, published, pyplot, read, save, sources, table


def transfer_rows(arch: str, starts: list[str], datasets: list[str], root: Path = Path(".")) -> list[dict]:
    """One row per (start, dataset): the fine-tune's downstream val top-1 and its val size, the start's ImageNet-val
    top-1 (ours: the final val top-1 of its training, where the start is one of the grid's models; published: the
    paper's)."""
    paper = {r["start"]: r for r in published("paper_transfer.csv")}
    out = []
    for start in starts:
        ours_imagenet = (read(Outputs.of(arch, start, root=root).train_metrics) or {}).get("val/top1")
        for dataset in datasets:
            o = Outputs.finetune(arch, start, dataset, root=root)
            m, run = read(o.train_metrics) or {}, read(o.run_file) or {}
            ref = paper.get(start, {})
            out.append(
                {
                    "start": start,
                    "dataset": dataset,
                    "top1": m.get("val/top1"),
                    "count": m.get("val/count"),
                    "train_s": m.get("train/wall_s"),
                    "imagenet_top1": ours_imagenet,
                    "paper_imagenet_top1": float(ref["imagenet_val_top1"]) if ref.get("imagenet_val_top1") else None,
                    "paper_top1": float(ref["downstream_top1"]) if ref.get("downstream_top1") else None,
                    "paper_source": ref.get("source"),
                    "run_id": run.get("run_id"),
                }
            )
    return out


def _noise(a: dict, b: dict) -> float | None:
    """Two standard errors of the difference of two binomial top-1s (None where a split size is unknown)."""
    sa, sb = binomial_se(a["top1"], a.get("count")), binomial_se(b["top1"], b.get("count"))
    return None if sa is None or sb is None else 2 * math.hypot(sa, sb)


def transfer_summary(rows: list[dict], scratch: str = "scratch") -> dict:
    """Per start: the mean downstream top-1 over the datasets it has all of (None otherwise), its rank; per dataset:
    the best pretrained start's lead over `scratch`, and whether that lead exceeds the noise (two binomial s.e.)."""
    starts, datasets, cell = table(rows, "start", "dataset")
    means: dict[str, float | None] = {}
    for st in starts:
        vals = [cell[st, d]["top1"] for d in datasets]
        means[st] = None if None in vals else sum(vals) / len(vals)
    known = {st: m for st, m in means.items() if m is not None}
    ranked = sorted(known, key=known.__getitem__, reverse=True)
    ses: dict[str, float | None] = {}  # binomial s.e. of each start's mean (None where a val size is unknown)
    for st in ranked:
        parts = [binomial_se(cell[st, d]["top1"], cell[st, d]["count"]) for d in datasets]
        ses[st] = None if None in parts else math.sqrt(sum(x * x for x in parts if x is not None)) / len(parts)
    # between neighbours in the ranking: ">" when the lead exceeds two s.e. of the difference, else "~" (noise)
    gaps = []
    for a, b in zip(ranked, ranked[1:]):
        sa, sb = ses[a], ses[b]
        gaps.append(">" if sa is None or sb is None or known[a] - known[b] > 2 * math.hypot(sa, sb) else "~")
    lead: dict[str, dict | None] = {}
    for d in datasets:
        pre = [cell[st, d] for st in starts if st != scratch and cell[st, d]["top1"] is not None]
        base = cell.get((scratch, d))
        if not pre or base is None or base["top1"] is None:
            lead[d] = None
            continue
        best = max(pre, key=lambda r: r["top1"])
        noise = _noise(best, base)
        lead[d] = {
            "start": best["start"],
            "points": best["top1"] - base["top1"],
            "noise": noise,
            "beyond_noise": noise is not None and best["top1"] - base["top1"] > noise,
        }
    return {"means": means, "ranked": ranked, "gaps": gaps, "lead_over_scratch": lead}


def transfer_markdown(rows: list[dict], summary: dict, recipe: str, caption: str) -> str:
    starts, datasets, cell = table(rows, "start", "dataset")
    first = {r["start"]: r for r in rows}
    lines = [
        "# Transfer learning: one fine-tuning procedure from each pretraining (the paper's figure 7)",
        "",
        caption,
        "",
        f"Downstream val top-1 (%) after fine-tuning with `recipes.{recipe}` (the same procedure for every start "
        "and dataset; not the paper's hyperparameters, which no source we hold gives). ImageNet-val: the start's "
        "top-1 on this run's ImageNet at the end of its training (ours; empty for a start not trained here) and "
        "as published. Published downstream numbers are empty: the "
        "figure's values are not in a source we could verify.",
        "",
        "| start | ImageNet-val ours (published) | " + " | ".join(datasets) + " | mean |",
        "|---" * (len(datasets) + 3) + "|",
    ]
    for st in starts:
        lines.append(
            f"| {st} | {fmt(first[st]['imagenet_top1'])} ({fmt(first[st]['paper_imagenet_top1'], 2)}) | "
            + " | ".join(fmt(cell[st, d]["top1"]) for d in datasets)
            + f" | {fmt(summary['means'][st])} |"
        )
    lines += [
        "",
        "Val images per dataset: "
        + ", ".join(
            f"{d} {next((cell[st, d]['count'] for st in starts if cell[st, d]['count']), None) or '?'}"
            for d in datasets
        )
        + " (one binomial standard error at 50% top-1 is 50/sqrt(N) points).",
    ]
    lines += ["", "## What the numbers say", ""]
    if summary["ranked"]:
        ranked = summary["ranked"]
        text = f"{ranked[0]} ({summary['means'][ranked[0]]:.2f})" + "".join(
            f" {g} {st} ({summary['means'][st]:.2f})" for g, st in zip(summary["gaps"], ranked[1:])
        )
        lines.append(
            f"Ranking by mean downstream top-1: {text} ('~': a lead under two binomial standard errors of "
            "the difference, i.e. noise at this size)."
        )
    for d, lead in summary["lead_over_scratch"].items():
        if lead is None:
            lines.append(f"- {d}: pretrained vs scratch undecided (a cell is missing or no scratch start).")
        else:
            verdict = "beyond noise" if lead["beyond_noise"] else "within noise (under two binomial s.e.)"
            lines.append(
                f"- {d}: the best pretrained start ({lead['start']}) leads scratch by {lead['points']:+.2f} "
                f"points, {verdict}" + (f" (2 s.e. = {lead['noise']:.2f})" if lead["noise"] else "") + "."
            )
    lines += [
        "",
        "The paper's finding (fig. 7, qualitative): A1 transfers best; A2 and the PyTorch default are close "
        "downstream although A2 is much better on ImageNet-val and V2; A3 is clearly worse downstream (the "
        "paper relates this to its 160 px training resolution).",
        "",
        sources(rows),
    ]
    return "\n".join(lines) + "\n"


def transfer_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    starts, datasets, cell = table(rows, "start", "dataset")
    width = 0.8 / max(1, len(starts))
    for i, st in enumerate(starts):
        xs = [j + (i - (len(starts) - 1) / 2) * width for j in range(len(datasets))]
        ys = [cell[st, d]["top1"] if cell[st, d]["top1"] is not None else 0 for d in datasets]
        ax.bar(xs, ys, width, label=st)
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set(ylabel="downstream val top-1 (%)", title="fine-tuned from each start (fig. 7)")
    ax.legend(fontsize=7, title="start")
    save(fig, path, caption)


def report(params, out: Path) -> tuple[dict, list[str]]:
    tr = params.transfer
    rows = transfer_rows(tr.arch, list(tr.starts), list(tr.datasets))
    if all(r["top1"] is None for r in rows):
        raise ConfigError(
            "studies/transfer/metrics/train: no (transfer.starts x transfer.datasets) pair is "
            "fine-tuned; run `dvc repro studies/dvc.yaml:transfer-report`"
        )
    summary = transfer_summary(rows)
    text = caption(params) + (
        f" Fine-tuning: recipes.{tr.recipe} x epochs factor {tr.scale(params.scale).epochs}, "
        f"lr factor {tr.scale(params.scale).lr_factor}."
    )
    write_text(out / "transfer.md", transfer_markdown(rows, summary, tr.recipe, text))
    write_csv(out / "transfer.csv", rows)
    transfer_plot(rows, out / "transfer.png", text)
    metrics = {f"transfer/{r['start']}-{r['dataset']}_top1": r["top1"] for r in rows}
    metrics.update({f"transfer/{st}_mean_top1": m for st, m in summary["means"].items()})
    return metrics, [r["run_id"] for r in rows if r["run_id"]]
