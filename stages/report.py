"""report: the paper's figure 4 for every trained (arch, recipe), beside the published numbers.

    python -m stages.report

Reads only the stages' JSON metrics (metrics/train, metrics/eval, metrics/benchmark) and data/prepared/info.json,
never MLflow; writes reports/figure4.md, .csv and .png, and logs them as the artifacts of a "report" MLflow run. The
caption states the scale and the device, so a mini run is never mistaken for the paper's.

Results card (2 cores AMD EPYC, mini default): about a second after imports; 6 rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rsb import errors, report, tracking
from rsb.config import ConfigError, load_params, scaled_size
from rsb.io import read_json, refuse_overlap, write_csv, write_text


def scale_text(params, info: dict) -> str:
    """What scale these numbers are at, so a mini run is never mistaken for the paper's."""
    s = params.scale
    paper = s.epochs == 1 and s.img_size == 224 and s.batch_size == 2048 and info.get("source") == "imagenet"
    if paper:
        return "Paper scale: ImageNet-1k, the recipes' epochs, 224 px, global batch 2048."
    n = info.get("images", {})
    return (f"Scale: {info.get('source', '?')} data ({info.get('classes', '?')} classes, {n.get('train', '?')} "
            f"train / {n.get('val', '?')} val / {n.get('v2', '?')} V2 images), epochs x{s.epochs:g} of the "
            f"paper's, 224 px -> {s.img_size} px, global batch {s.batch_size}. NOT comparable to the paper's "
            "ImageNet numbers, which stand beside ours for reference.")


def caption(params, info: dict, device: str) -> str:
    return (f"{scale_text(params, info)} Params and GMACs: the ImageNet model at 224 px. Throughput and peak memory: "
            f"batch {params.benchmark.batch_size} at {params.benchmark.img_size} px on {device}.")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Build the figure-4 table.")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--metrics", type=Path, default=Path("metrics"))
    p.add_argument("--out", type=Path, default=Path("reports"))
    args = p.parse_args(argv)
    params = load_params(args.params)
    refuse_overlap({"--out": args.out}, {"--metrics": args.metrics, "data.prepared": Path(params.data.prepared),
                                         "data.raw": Path(params.data.raw)})
    sizes = {name: (scaled_size(params.recipe(name).img_size, params.scale),
                    scaled_size(params.recipe(name).test_img_size, params.scale)) for name in params.run}
    table = report.rows(args.metrics, list(params.models), list(params.run), sizes)
    if not table:
        raise ConfigError(f"{args.metrics}/eval: no evaluation of any (models x run) pair; run the evaluate stages")
    info_file = Path(params.data.prepared) / "info.json"
    info = read_json(info_file) if info_file.is_file() else {}
    devices = sorted({read_json(f).get("device", "?") for f in (args.metrics / "benchmark").glob("*.json")
                      if f.stem in params.models})
    text = caption(params, info, ", ".join(devices) or "(no benchmark)")
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "figure4.md", report.markdown(table, text))
    write_csv(args.out / "figure4.csv", table)
    report.plot(table, args.out / "figure4.png", text)
    t = tracking.start(True, params.experiment, "report", None,
                       {**tracking.provenance("report", tracking.digest(params), Path(params.data.prepared)),
                        "rsb.kind": "report"})
    for name in ("figure4.md", "figure4.csv", "figure4.png"):
        t.log_artifact(args.out / name, "report")
    t.end()
    print((args.out / "figure4.md").read_text())
    return {"rows": len(table)}


if __name__ == "__main__":
    errors.run(main)
