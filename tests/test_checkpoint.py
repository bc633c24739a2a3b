"""rsb.checkpoint: what a checkpoint must match to be resumed (the resume digest), and the checks before DeepSpeed's
full unpickler runs (tampered, crafted, truncated, another run's); a divergence keeps the last good checkpoint.
Kill -9 and resume, bit for bit: test_reliability.py (the fault matrix)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_params

from rsb import checkpoint
from rsb.config import load_params

NAME = "test_resnet-a1"


def test_a_real_divergence_stops_with_the_last_good_checkpoint(tmp_path, prepared, monkeypatch, world):
    """From update 11 (epoch 2) the lr is 1e30: LAMB's update (lr x trust ratio x ||w||) makes the weights
    non-finite for real, the loss of update 12 is NaN, and the stage stops before writing epoch 2's checkpoint;
    epoch 1's is intact, verifies, and resumes into finite weights through checkpoint.load."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from rsb.engine import NonFiniteLoss
    from stages.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = write_params(tmp_path / "params.yaml", prepared, {"scale.min_epochs": 2, "train.precision": "fp32"})
    seen = {"steps": 0}

    def huge_lr_from_update_11(optimizer, args, kwargs):
        seen["steps"] += 1
        seen["weights"] = [q for g in optimizer.param_groups for q in g["params"]]
        if seen["steps"] >= 11:
            for g in optimizer.param_groups:
                g["lr"] = 1e30

    handle = register_optimizer_step_pre_hook(huge_lr_from_update_11)
    try:
        with pytest.raises(NonFiniteLoss, match=r"non-finite loss nan at update 12 \(epoch 1\)"):
            main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])
    finally:
        handle.remove()
    assert not all(torch.isfinite(q).all() for q in seen["weights"]), "the weights really diverged"
    (ckpt,) = (tmp_path / "checkpoints" / NAME).iterdir()
    assert checkpoint.latest_tag(ckpt) == "epoch1"
    checkpoint.verify(ckpt / "epoch1")
    eng = tiny_engine(tmp_path)
    client = checkpoint.load(eng, ckpt, ckpt.name)
    assert client["epoch"] == 1 and all(torch.isfinite(q).all() for q in eng.module.parameters())
    assert not (tmp_path / "models" / f"{NAME}.safetensors").exists()


def tiny_engine(tmp_path: Path):
    from rsb import distributed
    from rsb.config import resolve
    from rsb.models import create_model
    from rsb.training import create_optimizer

    r = resolve(
        load_params(write_params(tmp_path / "tiny.yaml", tmp_path, {"train.precision": "fp32"})),
        "test_resnet",
        "a1",
        world_size=1,
    )
    model = create_model(r, 20)
    return distributed.initialize(model, create_optimizer(model, r), r)


@pytest.fixture
def saved(tmp_path, world) -> tuple[object, Path]:
    """A real DeepSpeed checkpoint of a real engine, and that engine to resume into."""
    eng = tiny_engine(tmp_path)
    ckpt = tmp_path / "ck"
    checkpoint.save(eng, ckpt, "epoch1", {"digest": "d", "epoch": 1, "mlflow_run_id": None})
    assert checkpoint.load(eng, ckpt, "d")["epoch"] == 1  # the untouched checkpoint resumes
    return eng, ckpt


def test_a_tampered_checkpoint_is_refused_on_resume(saved):
    eng, ckpt = saved
    model = next((ckpt / "epoch1").glob("*model_states.pt"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointMismatch, match="content differs from what was written"):
        checkpoint.load(eng, ckpt, "d")


def test_a_crafted_checkpoint_is_never_unpickled_on_resume(saved, tmp_path):
    """Even with its hash updated in rsb.json, a pickle that runs code is refused before DeepSpeed loads it."""
    import hashlib

    eng, ckpt = saved
    model = next((ckpt / "epoch1").glob("*model_states.pt"))

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"module": Payload()}, model)
    meta = json.loads((ckpt / "epoch1" / "rsb.json").read_text())
    meta["files"][model.name] = hashlib.sha256(model.read_bytes()).hexdigest()
    (ckpt / "epoch1" / "rsb.json").write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointMismatch, match="does not load with weights_only=True"):
        checkpoint.load(eng, ckpt, "d")
    assert not (tmp_path / "pwned").exists()


def test_a_truncated_or_incomplete_checkpoint_is_refused_on_resume(saved):
    eng, ckpt = saved
    model = next((ckpt / "epoch1").glob("*model_states.pt"))  # ZeRO-0, client optimizer: model + optimizer
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(checkpoint.CheckpointMismatch, match="content differs"):
        checkpoint.load(eng, ckpt, "d")
    model.unlink()
    with pytest.raises(checkpoint.CheckpointMismatch, match="incomplete or was edited"):
        checkpoint.load(eng, ckpt, "d")


def test_a_checkpoint_of_another_run_is_refused(saved):
    eng, ckpt = saved
    with pytest.raises(checkpoint.CheckpointMismatch, match="written for recipe digest d,"):
        checkpoint.load(eng, ckpt, "e")


def test_resume_digest_follows_recipe_code_and_versions(tmp_path, monkeypatch):
    """A checkpoint resumes only the same resolved recipe, training code and library versions."""
    import importlib.metadata as md
    import shutil

    from rsb import checkpoint
    from rsb import code as rsb_code

    src = tmp_path / "src"
    shutil.copytree(Path(checkpoint.__file__).parent, src / "rsb")
    for job in rsb_code.JOBS.values():
        base = checkpoint.resume_digest("recipe", job, src)
        assert base == checkpoint.resume_digest("recipe", job, src) == checkpoint.resume_digest("recipe", job)
        assert checkpoint.resume_digest("other recipe", job, src) != base
        files = rsb_code.files(job, src)
        assert src / "rsb/compat.py" in files and src / "rsb/tracking/runs.py" not in files
        for f in files:  # every module the job imports, compat.py (timm's posterize, patched at import) included
            original = f.read_bytes()
            f.write_bytes(original + b"\n# a fix\n")
            assert checkpoint.resume_digest("recipe", job, src) != base, f
            f.write_bytes(original)
        tracking = src / "rsb/tracking/runs.py"  # records only (rsb.code): an MLflow fix resumes
        original = tracking.read_bytes()
        tracking.write_bytes(original + b"\n# a fix\n")
        assert checkpoint.resume_digest("recipe", job, src) == base
        tracking.write_bytes(original)
    real, base = md.version, checkpoint.resume_digest("recipe", "rsb.trainer", src)
    for pkg in ("torch", "timm", "deepspeed"):
        monkeypatch.setattr(md, "version", lambda name, pkg=pkg: "0.0.1" if name == pkg else real(name))
        assert checkpoint.resume_digest("recipe", "rsb.trainer", src) != base, pkg
    monkeypatch.setattr(md, "version", real)


def test_a_new_checkpoint_replaces_the_old_only_once_it_is_published(saved, monkeypatch):
    """keep_checkpoints = 1: a write that fails half-way (the disk full after the first file) leaves epoch1 published
    and intact; a complete one is published first, and only then the older one goes."""
    import errno

    from rsb.io import NoRoom

    eng, ckpt = saved
    save = eng.save_checkpoint

    def fails_half_way(save_dir, tag, **kw):
        (Path(save_dir) / tag).mkdir()
        (Path(save_dir) / tag / "mp_rank_00_model_states.pt").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eng, "save_checkpoint", fails_half_way)
    with pytest.raises(NoRoom, match="the checkpoint epoch1.3 could not be written"):
        checkpoint.save(eng, ckpt, "epoch1.3", {"digest": "d", "epoch": 1, "position": 3, "mlflow_run_id": None})
    assert checkpoint.latest_tag(ckpt) == "epoch1" and sorted(p.name for p in ckpt.iterdir()) == ["epoch1", "latest"]
    checkpoint.verify(ckpt / "epoch1")
    monkeypatch.setattr(eng, "save_checkpoint", save)
    checkpoint.save(eng, ckpt, "epoch1.3", {"digest": "d", "epoch": 1, "position": 3, "mlflow_run_id": None})
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch1.3", "latest"]


def test_the_newest_complete_checkpoints_are_kept(saved):
    """keep_checkpoints = 2, in the run's order (epoch1 < epoch1.3 < epoch1.10 < epoch2: not the names' order); a
    folder an interrupted write left (no rsb.json, or beyond `latest`) goes, a complete one is never counted twice."""
    eng, ckpt = saved
    for tag, epoch, position in (("epoch1.3", 1, 3), ("epoch1.10", 1, 10)):
        checkpoint.save(eng, ckpt, tag, {"digest": "d", "epoch": epoch, "position": position}, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch1.10", "epoch1.3", "latest"]
    (ckpt / "epoch1.12").mkdir()  # a write killed before rsb.json
    checkpoint.save(eng, ckpt, "epoch2", {"digest": "d", "epoch": 2}, keep=2)
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch1.10", "epoch2", "latest"]
    assert checkpoint.load(eng, ckpt, "d")["epoch"] == 2
    assert [checkpoint.order(t) for t in ("epoch1", "epoch1.3", "epoch1.10", "epoch2", "x")] == [
        (1, 0),
        (1, 3),
        (1, 10),
        (2, 0),
        (-1, -1),
    ]
