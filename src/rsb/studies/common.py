"""What every study shares: the published numbers of rsb/reference, statistics, table and figure helpers."""

from __future__ import annotations

import csv
import io
import math
from importlib.resources import files
from pathlib import Path

from rsb.io import atomic, read_json
from rsb.report import scale_text

SPLITS = ("val", "real", "v2")
SPLIT_NAMES = {"val": "ImageNet-val", "real": "ImageNet-ReaL", "v2": "ImageNetV2"}


def read(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def published(name: str) -> list[dict]:
    """A CSV of rsb/reference (its README cites every number's source); empty cells become None."""
    text = files("rsb.reference").joinpath(name).read_text()
    return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


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


def fmt(v, digits: int = 2) -> str:
    return "" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], a: str, b: str) -> tuple[list, list, dict]:
    """The row keys, the column keys (each in first-seen order) and the cells of a two-key table."""
    return (
        list(dict.fromkeys(r[a] for r in rows)),
        list(dict.fromkeys(r[b] for r in rows)),
        {(r[a], r[b]): r for r in rows},
    )


def sources(rows: list[dict]) -> str:
    return "Sources: " + "; ".join(sorted({r["paper_source"] for r in rows if r["paper_source"]})) + "."


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, caption: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def caption(params) -> str:
    """The scale line every study's files carry (rsb.report.scale_text of the prepared data)."""
    info_file = Path(params.data.prepared) / "info.json"
    return scale_text(params, read_json(info_file) if info_file.is_file() else {})
