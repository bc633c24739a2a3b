"""Shared fixtures: a tiny mini release and its prepared folder, built once per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from rsb.config import override
from rsb.data.mini import write_release
from rsb.data.spec import MiniSpec

ROOT = Path(__file__).resolve().parents[1]
TINY = MiniSpec(seed=1, classes=20, train_per_class=8, val_per_class=4, v2_per_class=2, image_size=48)

# The in-process tests compare against CPU references: DeepSpeed, the model and the data all on the CPU, also on a
# CUDA machine. tests/test_gpu.py runs its stages in subprocesses with DS_ACCELERATOR=cuda.
os.environ["DS_ACCELERATOR"] = "cpu"

# Under pytest-xdist every worker is one process of the suite: its torch threads share the cores with the others'
# (N workers x all cores thrash). Subprocesses the tests start set their own threads (train.threads).
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session", autouse=True)
def dvc_site_cache(tmp_path_factory):
    """DVC keeps a per-repository index in its site cache (/var/tmp/dvc/repo/<hash>, ~350 kB each): every test
    repository would leave one there. Under pytest's temp folder, which pytest prunes, and only if the user has not
    chosen a place."""
    os.environ.setdefault("DVC_SITE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "dvc-site-cache"))


# The files that take longest, first (pyproject's --no-loadscope-reorder keeps this order): under --dist loadfile each
# file runs on one worker, and a long file started last would leave the other cores idle at the end. Measured
# 2026-12-03 on 2 cores (`pytest --durations=0`, seconds of each file's tests, before two pipeline tests became
# plan checks): pipeline 910, benchmark 302, tracking 296, train 233, reliability 213, launch 87, inputs 66, finetune
# 60, studies 59; the rest under 20 each.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_benchmark.py",
    "test_tracking.py",
    "test_train.py",
    "test_reliability.py",
    "test_launch.py",
    "test_inputs.py",
    "test_finetune.py",
    "test_studies.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order is kept


def run_if(min_gpus: int = 0):
    """Missing hardware becomes a readable skip."""
    have = torch.cuda.device_count()
    return pytest.mark.skipif(have < min_gpus, reason=f"needs {min_gpus} CUDA GPU(s), found {have}")


@pytest.fixture(scope="session")
def world() -> int:
    """This test process as a world of one (DeepSpeed's engine needs a process group)."""
    from rsb import distributed

    distributed.init()
    return torch.distributed.get_world_size()


@pytest.fixture(scope="session")
def release(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mini")
    return out, write_release(out, TINY)


@pytest.fixture
def release_copy(release, tmp_path) -> Path:
    """A private copy of the release a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(release[0], dst)
    return dst


@pytest.fixture(scope="session")
def extracted(release, tmp_path_factory) -> Path:
    """The release extracted with the standard library alone, in the layout labs keep ImageNet in:
    train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, v2/<class index>/*, plus the devkit and real.json. Independent of rsb's
    reader: the fidelity reference's ImageFolder reads it, and it is the `folder` source's test input."""
    import io
    import tarfile

    from rsb.data.index import ARCHIVES

    out = tmp_path_factory.mktemp("extracted")
    raw, summary = release
    with tarfile.open(raw / ARCHIVES["train"]) as outer:
        for member in outer:
            with tarfile.open(fileobj=io.BytesIO(outer.extractfile(member).read())) as inner:
                inner.extractall(out / "train" / member.name.removesuffix(".tar"), filter="data")
    wnids = sorted(d.name for d in (out / "train").iterdir())
    with tarfile.open(raw / ARCHIVES["val"]) as val:
        for i, member in enumerate(sorted(val.getmembers(), key=lambda m: m.name)):
            target = out / "val" / wnids[summary["val_labels"][i]]
            target.mkdir(parents=True, exist_ok=True)
            (target / member.name).write_bytes(val.extractfile(member).read())
    with tarfile.open(raw / ARCHIVES["v2"]) as v2:
        for member in v2.getmembers():
            if member.isfile():
                target = out / "v2" / Path(member.name).parent.name
                target.mkdir(parents=True, exist_ok=True)
                (target / Path(member.name).name).write_bytes(v2.extractfile(member).read())
    for key in ("devkit", "real"):
        shutil.copy(raw / ARCHIVES[key], out / ARCHIVES[key])
    return out


@pytest.fixture(scope="session")
def prepared(release, tmp_path_factory) -> Path:
    from rsb.data.prepare import build

    out = tmp_path_factory.mktemp("data") / "prepared"
    build(release[0], out, "mini", verify_md5=False)
    return out


def write_params(path: Path, prepared: Path, overrides: dict | None = None) -> Path:
    """The project's params.yaml at a test's scale: tiny model, tiny images, few updates; `overrides` by dotted key."""
    import yaml

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    base = {
        "data.prepared": str(prepared),
        "models": ["test_resnet", "resnet18"],
        "run": ["a1", "a3"],
        "scale.epochs": 0.005,
        "scale.min_epochs": 2,
        "scale.img_size": 32,
        "scale.batch_size": 16,
        "train.micro_batch": 8,
        "train.workers": 0,
        "train.threads": 1,
        "evaluate.workers": 0,
        "benchmark.img_size": 64,
        "benchmark.batch_size": 8,
        "benchmark.repeats": 2,
        "benchmark.warmup": 1,
    }
    override(p, {**base, **(overrides or {})})
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def clean_env(**extra: str) -> dict:
    """The environment of a fresh shell for a subprocess: none of the process-group variables an in-process test
    left behind, no tracking settings unless given, this checkout importable."""
    inherited = os.environ.get("PYTHONPATH")  # wheels carried onto PYTHONPATH (bench/gpu.sh): extended, never replaced
    extra["PYTHONPATH"] = ":".join(filter(None, [extra.get("PYTHONPATH", f"{ROOT / 'src'}:{ROOT}"), inherited]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "MLFLOW_TRACKING_URI",
        "RSB_TRACKING",
        "DVC_EXP_NAME",
    ):
        env.pop(k, None)
    return {**env, **extra}
