"""Training cost against accuracy (paper fig. 1): device-hours of each (model, recipe) beside its top-1."""

from __future__ import annotations

from pathlib import Path

from rsb.config import ConfigError
from rsb.io import write_csv, write_text
from rsb.outputs import Outputs
from rsb.studies.common import caption, fmt, published, pyplot, read, save


def cost_rows(models: list[str], recipes: list[str], root: Path = Path(".")) -> list[dict]:
    """Each trained (arch, recipe): devices, device kind, wall time of its epochs, device-hours, top-1."""
    out = []
    for arch in models:
        for recipe in recipes:
            o = Outputs.of(arch, recipe, root=root)
            tr, ev, run = read(o.train_metrics), read(o.eval_metrics) or {}, read(o.run_file) or {}
            if tr is None:
                continue
            out.append(
                {
                    "arch": arch,
                    "recipe": recipe,
                    "epochs": tr.get("epochs"),
                    "devices": tr.get("devices"),
                    "device": run.get("tags", {}).get("rsb.device"),
                    "wall_h": _hours(tr.get("train/wall_s")),
                    "device_hours": tr.get("device_hours"),
                    "val_top1": ev.get("val/top1"),
                    "v2_top1": ev.get("v2/top1"),
                }
            )
    return out


def _hours(seconds: float | None) -> float | None:
    return None if seconds is None else seconds / 3600


def cost_paper() -> list[dict]:
    out = []
    for row in published("paper_costs.csv"):
        devices, hours = row["devices"], row["hours"]
        out.append(
            {
                **row,
                "device_hours": float(devices) * float(hours) if devices and hours else None,
                "val_top1": float(row["val_top1"]) if row["val_top1"] else None,
            }
        )
    return out


def cost_markdown(rows: list[dict], caption: str) -> str:
    lines = [
        "# Training cost against accuracy (the paper's figure 1)",
        "",
        caption,
        "",
        "Device-hours = devices x the wall time of the training epochs (training, BN sync and validation; not "
        "start-up or checkpoints).",
        "",
        "| arch | recipe | epochs | devices | device | wall (h) | device-hours | val top-1 | V2 top-1 |",
        "|---" * 9 + "|",
    ]
    lines += [
        f"| {r['arch']} | {r['recipe']} | {fmt(r['epochs'])} | {fmt(r['devices'])} | {r['device'] or ''} | "
        f"{fmt(r['wall_h'], 4)} | {fmt(r['device_hours'], 4)} | {fmt(r['val_top1'])} | {fmt(r['v2_top1'])} |"
        for r in rows
    ]
    lines += [
        "",
        "Published (ImageNet-1k, 224 px; empty: not published in a source we could verify):",
        "",
        "| arch | recipe | epochs | devices | device | wall (h) | device-hours | val top-1 | source |",
        "|---" * 9 + "|",
    ]
    for p in cost_paper():
        lines.append(
            f"| {p['arch']} | {p['recipe']} | {p['epochs'] or ''} | {p['devices'] or ''} | {p['device'] or ''} "
            f"| {p['hours'] or ''} | {fmt(p['device_hours'], 1)} | {fmt(p['val_top1'], 1)} | {p['source']} |"
        )
    return "\n".join(lines) + "\n"


def cost_plot(rows: list[dict], path: Path, caption: str) -> None:
    plt = pyplot()
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
    save(fig, path, caption)


def report(params, out: Path) -> tuple[dict, list[str]]:
    rows = cost_rows(list(params.models), list(params.run))
    if not rows:
        raise ConfigError("metrics/train: no trained (models x run) pair; run `dvc repro` first")
    text = caption(params)
    write_text(out / "cost.md", cost_markdown(rows, text))
    write_csv(out / "cost.csv", rows)
    cost_plot(rows, out / "cost.png", text)
    metrics = {f"cost/{r['arch']}-{r['recipe']}_device_hours": r["device_hours"] for r in rows}
    return metrics, []  # its trainings are the grid's, children of the architectures study
