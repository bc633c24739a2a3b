"""benchmark: params and GMACs at 224 equal the published values; the JSON carries every field, positive, with
device."""

from __future__ import annotations

import json

import pytest
import timm

from rsb import profiling
from rsb.report import reference


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_params_and_gmacs_match_the_reference(arch):
    ref = reference()[(arch, "a1")]
    got = profiling.count(timm.create_model(arch, num_classes=1000), 224)
    assert got["params_m"] == pytest.approx(float(ref["params_m"]), rel=0.01)
    assert got["gmacs"] == pytest.approx(float(ref["gmacs_at_224"]), rel=0.01)


def test_stage_json_fields(tmp_path, prepared, monkeypatch):
    from conftest import write_params

    from stages.benchmark import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = write_params(tmp_path / "params.yaml", prepared)
    main(["--arch", "test_resnet", "--params", str(p)])
    m = json.loads((tmp_path / "metrics/benchmark/test_resnet.json").read_text())
    for key in ("params_m", "gmacs", "img_per_s", "peak_mem_mb", "batch", "resolution"):
        assert m[key] > 0, key
    assert m["batch"] == 8 and m["resolution"] == 64 and len(m["batch_ms"]) == 2
    assert m["device"] and m["precision"] in ("fp32", "bf16", "fp16") and m["peak_mem_kind"]
    assert set(m["versions"]) == {"python", "torch", "timm", "deepspeed"}


@pytest.mark.slow  # ~5 min: two wheel sets (one built from DeepSpeed's source archive), a fresh venv, 3 steps
def test_gpu_rehearsal_on_a_clean_clone(tmp_path):
    """`bash bench/gpu_wheels.sh && bash bench/gpu.sh --rehearse` on a clean clone: the GPU script in a fresh
    virtual environment holding only the GPU image's packages, the carried wheels installed as there (--target,
    PYTHONPATH only, no console script): the gpu tests import and skip, the pipeline's commands run through the real
    launcher on 2 processes (DeepSpeed's runner as a module), and bench/gpu.py measures (its `--dry-run`: tiny sizes,
    the prefetcher on, no compiled run)."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from conftest import ROOT, clean_env

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    # everything's temp folder (the rehearsal's environment, the benchmarks' scratch), short: DataLoader workers
    # hand batches over Unix sockets under it, whose paths may not pass 107 characters
    tmp = Path(tempfile.mkdtemp(prefix="rsb-t-"))
    try:
        env = {k: v for k, v in clean_env(TMPDIR=str(tmp)).items() if k != "PYTHONPATH"}
        out = subprocess.run(
            ["bash", "-c", "bash bench/gpu_wheels.sh && bash bench/gpu.sh --rehearse out"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert sorted(p.name for p in tmp.iterdir()) == [], "left in the temp folder"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wheels = sorted(p.name.split("-")[0] for p in (clone / ".whl").glob("*.whl"))
    assert wheels == [
        "annotated_types",
        "deepspeed",
        "hjson",
        "pydantic",
        "pydantic_core",
        "timm",
        "typing_extensions",
        "typing_inspection",
    ]
    assert "6 skipped" in (clone / "out/gpu-tests.log").read_text()
    stage = json.loads((clone / "out/stage.json").read_text())
    assert stage["devices"] == 2 and [s["rc"] for s in stage["steps"]] == [0, 0, 0, 0]
    assert stage["eval"]["val/count"] == 16, "evaluate scored the whole mini val (4 classes x 4)"
    result = json.loads((clone / "out/gpu.json").read_text())  # bench/gpu.py's dry run, in the image's packages
    assert result["dry_run"] and result["train"]["bare_img_s"] > 0 and result["train"]["ours_img_s"] > 0
    assert result["train"]["ceiling_img_s"] > 0 and result["window_updates"] >= 30
    assert result["loader"]["img_s_per_worker"] > 0 and result["benchmark"]["peak_mem_mb"] > 0
    # the phases in the order they ran, each done, and the script's own order of steps in what it wrote
    assert list(result["phases"]) == ["data", "train", "ceiling", "loader", "benchmark"], result["phases"]
    assert all(v.startswith("done") for v in result["phases"].values()), result["phases"]
    assert "| phase ceiling | done" in (clone / "out/gpu.md").read_text()
    versions = (clone / "out/versions.txt").read_text()
    assert "torch" in versions and "typing_extensions" in versions and "no CUDA device" in versions
    assert (clone / "out/gpu-tests-summary.txt").is_file()
