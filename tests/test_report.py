"""report: built from fixture JSONs, the table has the expected cells and deltas against the published numbers."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_params


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def metrics(tmp_path):
    m = tmp_path / "metrics"
    _write(
        m / "benchmark/resnet50.json",
        {"params_m": 25.557, "gmacs": 4.089, "img_per_s": 31.5, "peak_mem_mb": 2100.0, "device": "cpu: test"},
    )
    _write(m / "eval/resnet50-a1.json", {"val/top1": 81.382, "real/top1": 85.212, "v2/top1": 68.47})
    _write(m / "eval/resnet50-a3.json", {"val/top1": 70.0, "real/top1": 75.0, "v2/top1": 60.0})
    _write(m / "train/resnet50-a1.json", {"train/time_s": 12.5})
    _write(
        m / "benchmark/resnet18.json",
        {"params_m": 11.69, "gmacs": 1.82, "img_per_s": 90.0, "peak_mem_mb": 900.0, "device": "cpu: test"},
    )
    _write(m / "eval/resnet18-a1.json", {"val/top1": 71.0, "real/top1": 79.0, "v2/top1": 59.0})
    _write(m / "eval/resnet152-a1.json", {"val/top1": 1.0, "real/top1": 1.0, "v2/top1": 1.0})  # not in models
    return m


def test_report_cells_and_deltas(tmp_path, metrics, prepared, monkeypatch):
    from stages.report import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = write_params(
        tmp_path / "params.yaml",
        prepared,
        {"models": ["resnet50", "resnet18"], "run": ["a1", "a2", "a3"], "scale.img_size": 64},
    )
    assert main(["--params", str(p)]) == {"rows": 3}
    rows = list(csv.DictReader(open(tmp_path / "reports/figure4.csv")))
    # `models` order, then `run` order; an architecture added to `models` adds its rows after the others'
    assert [(r["arch"], r["recipe"]) for r in rows] == [("resnet50", "a1"), ("resnet50", "a3"), ("resnet18", "a1")]
    a1, a3, _ = rows
    assert float(a1["val_top1_paper"]) == 80.382 and float(a1["val_top1_delta"]) == pytest.approx(1.0)
    assert float(a1["real_top1_delta"]) == pytest.approx(-0.5) and float(a1["v2_top1_delta"]) == pytest.approx(0.0)
    assert float(a1["params_m"]) == 25.557 and a1["train_res"] == "64" and a3["train_res"] == "46"
    assert float(a3["val_top1_paper"]) == 78.052
    md = (tmp_path / "reports/figure4.md").read_text()
    assert (
        "| resnet50 | a1 | 25.56 | 4.089 | 64 / 64 | 31.5 | 2100 | 81.38 (80.38, +1.00) | 85.21 (85.71, -0.50) |" in md
    )
    assert "NOT comparable to the paper's" in md and "cpu: test" in md
    assert (tmp_path / "reports/figure4.png").stat().st_size > 10_000


def test_report_without_evaluations_fails_clearly(tmp_path, prepared, monkeypatch):
    from rsb.config import ConfigError
    from stages.report import main

    monkeypatch.chdir(tmp_path)
    p = write_params(tmp_path / "params.yaml", prepared)
    with pytest.raises(ConfigError, match="no evaluation"):
        main(["--params", str(p)])
