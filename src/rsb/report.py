"""The figure-4 table: our (arch, recipe) rows beside the published numbers, from the stages' JSON metrics only."""

from __future__ import annotations

import csv
import io
from importlib.resources import files
from pathlib import Path

from rsb import tracking
from rsb.config import ConfigError, Params, scaled_size
from rsb.io import atomic, read_json, refuse_overlap, write_csv, write_text

SPLITS = (("val", "val_top1"), ("real", "real_top1"), ("v2", "v2_top1"))


def reference() -> dict[tuple[str, str], dict]:
    """(model, recipe) -> the published row (rsb/reference/rsb_timm_results.csv; its README cites the sources)."""
    text = files("rsb.reference").joinpath("rsb_timm_results.csv").read_text()
    return {(row["model"], row["recipe"]): row for row in csv.DictReader(io.StringIO(text))}


def _read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def rows(
    metrics_dir: Path, models: list[str], recipes: list[str], train_sizes: dict[str, tuple[int, int]]
) -> list[dict]:
    """One row per trained (arch, recipe) with an evaluation; published values and deltas beside ours."""
    ref, out = reference(), []
    for arch in models:
        bench = _read(metrics_dir / "benchmark" / f"{arch}.json") or {}
        for recipe in recipes:
            ev = _read(metrics_dir / "eval" / f"{arch}-{recipe}.json")
            if ev is None:
                continue
            tr = _read(metrics_dir / "train" / f"{arch}-{recipe}.json") or {}
            paper = ref.get((arch, recipe), {})
            row = {
                "arch": arch,
                "recipe": recipe,
                "params_m": bench.get("params_m"),
                "gmacs": bench.get("gmacs"),
                "train_res": train_sizes[recipe][0],
                "test_res": train_sizes[recipe][1],
                "img_per_s": bench.get("img_per_s"),
                "peak_mem_mb": bench.get("peak_mem_mb"),
                "train_time_s": tr.get("train/time_s"),
            }
            for split, col in SPLITS:
                ours, published = ev.get(f"{split}/top1"), paper.get(col)
                published = float(published) if published not in (None, "") else None
                row[f"{split}_top1"] = ours
                row[f"{split}_top1_paper"] = published
                row[f"{split}_top1_delta"] = None if ours is None or published is None else ours - published
            row["params_m_paper"] = float(paper["params_m"]) if paper else None
            row["gmacs_paper"] = float(paper["gmacs_at_224"]) if paper else None
            out.append(row)
    return out


def _fmt(v, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(table: list[dict], caption: str) -> str:
    head = (
        "| arch | recipe | params (M) | GMACs | train / test px | img/s | peak mem (MB) | val top-1 (paper, Δ) "
        "| ReaL top-1 (paper, Δ) | V2 top-1 (paper, Δ) |"
    )
    lines = [f"# Figure 4, reproduced\n\n{caption}\n", head, "|" + "---|" * 10]
    for r in table:
        acc = [
            f"{_fmt(r[f'{s}_top1'])} ({_fmt(r[f'{s}_top1_paper'])}, {_delta(r[f'{s}_top1_delta'])})" for s, _ in SPLITS
        ]
        lines.append(
            f"| {r['arch']} | {r['recipe']} | {_fmt(r['params_m'])} | {_fmt(r['gmacs'], 3)} | "
            f"{r['train_res']} / {r['test_res']} | {_fmt(r['img_per_s'], 1)} | {_fmt(r['peak_mem_mb'], 0)} | "
            + " | ".join(acc)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _delta(v: float | None) -> str:
    return "–" if v is None else f"{v:+.2f}"


def plot(table: list[dict], path: Path, caption: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in table:
        label = f"{r['arch']}-{r['recipe']}"
        if r["img_per_s"] is not None:
            a.scatter(r["img_per_s"], r["val_top1"], label=label)
            if r["val_top1_paper"] is not None:
                a.scatter(r["img_per_s"], r["val_top1_paper"], marker="x", color="grey")
        if r["v2_top1"] is not None:
            b.scatter(r["val_top1"], r["v2_top1"], label=label)
        if r["v2_top1_paper"] is not None:
            b.scatter(r["val_top1_paper"], r["v2_top1_paper"], marker="x", color="grey")
    a.set(
        xlabel="inference img/s (batch 128, this device)",
        ylabel="ImageNet-val top-1 (%)",
        title="top-1 vs throughput (x: paper's top-1)",
    )
    b.set(xlabel="val top-1 (%)", ylabel="V2 top-1 (%)", title="val vs V2 (x: paper)")
    a.legend(fontsize=7)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def scale_text(params, info: dict) -> str:
    """What scale these numbers are at, so a mini run is never mistaken for the paper's."""
    s = params.scale
    paper = s.epochs == 1 and s.img_size == 224 and s.batch_size == 2048 and info.get("source") == "imagenet"
    if paper:
        return "Paper scale: ImageNet-1k, the recipes' epochs, 224 px, global batch 2048."
    n = info.get("images", {})
    return (
        f"Scale: {info.get('source', '?')} data ({info.get('classes', '?')} classes, {n.get('train', '?')} "
        f"train / {n.get('val', '?')} val / {n.get('v2', '?')} V2 images), epochs x{s.epochs:g} of the "
        f"paper's, 224 px -> {s.img_size} px, global batch {s.batch_size}. NOT comparable to the paper's "
        "ImageNet numbers, which stand beside ours for reference."
    )


def caption(params, info: dict, device: str) -> str:
    return (
        f"{scale_text(params, info)} Params and GMACs: the ImageNet model at 224 px. Throughput and peak memory: "
        f"batch {params.benchmark.batch_size} at {params.benchmark.img_size} px on {device}."
    )


def figure4(params: Params, metrics: Path, out: Path) -> list[dict]:
    """reports/figure4.{md,csv,png} from the stages' metrics (`metrics`/{train,eval,benchmark}), and a `report` run in
    MLflow holding them; returns the table's rows."""
    refuse_overlap(
        {"--out": out},
        {"--metrics": metrics, "data.prepared": Path(params.data.prepared), "data.raw": Path(params.data.raw)},
    )
    sizes = {
        name: (
            scaled_size(params.recipe(name).img_size, params.scale),
            scaled_size(params.recipe(name).test_img_size, params.scale),
        )
        for name in params.run
    }
    table = rows(metrics, list(params.models), list(params.run), sizes)
    if not table:
        raise ConfigError(f"{metrics}/eval: no evaluation of any (models x run) pair; run the evaluate stages")
    info_file = Path(params.data.prepared) / "info.json"
    info = read_json(info_file) if info_file.is_file() else {}
    devices = sorted(
        {read_json(f).get("device", "?") for f in (metrics / "benchmark").glob("*.json") if f.stem in params.models}
    )
    text = caption(params, info, ", ".join(devices) or "(no benchmark)")
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "figure4.md", markdown(table, text))
    write_csv(out / "figure4.csv", table)
    plot(table, out / "figure4.png", text)
    t = tracking.start(
        True,
        params.experiment,
        "report",
        None,
        {**tracking.provenance("report", tracking.digest(params), Path(params.data.prepared)), "rsb.kind": "report"},
    )
    for name in ("figure4.md", "figure4.csv", "figure4.png"):
        t.log_artifact(out / name, "report")
    t.end()
    return table
