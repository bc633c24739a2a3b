"""gpu: the train stage on CUDA, in subprocesses with DS_ACCELERATOR=cuda (the rest of the suite pins the CPU).
Skipped, with the reason, where no CUDA device is found; `bench/gpu.sh` runs these on a lent GPU machine."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, clean_env, run_if
from test_train import PARITY, launch, off, params_file, reference_run

pytestmark = [pytest.mark.gpu, run_if(min_gpus=1)]


def test_one_epoch_on_one_gpu_in_bf16_matches_the_cpu_fp32_reference(tmp_path, prepared, extracted):
    """The stage on cuda:0 with bf16 autocast against train.py's assembly on the CPU in fp32: same lr schedule;
    the first update's gradient within 5% (relative norm; bf16 rounding, measured ~1% on CPUs), losses within 2%."""
    cfg = {**PARITY, "train.precision": "bf16"}
    p = params_file(tmp_path, prepared, cfg)
    ours = launch(tmp_path, p, 1, accelerator="cuda")
    theirs = reference_run(p, extracted, 1, 2, cfg, "fp32")
    assert ours["lr"] == pytest.approx([u["lr"] for u in theirs.log], rel=1e-12)
    first = off(torch.cat([g.flatten() for g in ours["grads"][0]]),
                torch.cat([g.flatten() for g in theirs.log[0]["grads"]]))
    assert first < 0.05, first
    assert ours["loss"][:3] == pytest.approx([u["loss"] for u in theirs.log][:3], rel=0.02)
    run = json.loads((tmp_path / "runs/test_resnet-a1.json").read_text())
    assert run["tags"]["rsb.device"] != "cpu" and run["resolved"]["train"]["precision"] == "bf16"


def test_fp16_uses_a_loss_scaler_on_gpu():
    """precision fp16 (pre-Ampere GPUs): DeepSpeed's torch_autocast path scales the loss (a GradScaler)."""
    code = "\n".join([
        "import timm, torch",
        "from rsb import distributed",
        "from rsb.config import Resolved, Train",
        "distributed.init()",
        "r = Resolved(arch='test_resnet', recipe_name='a1', recipe=None, epochs=1, warmup_epochs=0, img_size=32,"
        " test_img_size=32, batch_size=8, lr=1e-3, micro_batch=8, grad_accum=1, world_size=1,"
        " train=Train(precision='fp16'))",
        "m = timm.create_model('test_resnet', num_classes=10).cuda()",
        "e = distributed.initialize(m, torch.optim.SGD(m.parameters(), lr=0.1), r)",
        "print('scaler', type(e.torch_autocast_z0_gradscaler).__name__)"])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(DS_ACCELERATOR="cuda",
                         PYTHONPATH=f"{ROOT}:{ROOT / 'src'}"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "scaler GradScaler" in out.stdout, out.stdout[-1000:] + out.stderr[-3000:]


@run_if(min_gpus=2)
def test_nccl_world_of_two_equals_one_gpu_accumulating(tmp_path, prepared):
    """Two GPUs through rsb.launch -> deepspeed (NCCL) against one GPU accumulating 2 micro-batches, fp32: the same
    micro-batches, so the same gradients up to reduction order (first update within 1e-4, relative norm)."""
    (tmp_path / "one").mkdir()
    p1 = params_file(tmp_path / "one", prepared, {**PARITY, "train.micro_batch": 8})
    one = launch(tmp_path / "one", p1, 1, accelerator="cuda")
    (tmp_path / "two").mkdir()
    p2 = params_file(tmp_path / "two", prepared, {**PARITY, "train.devices": 2, "train.micro_batch": 8})
    two = launch(tmp_path / "two", p2, 2, accelerator="cuda")
    assert one["lr"] == two["lr"]
    first = off(torch.cat([g.flatten() for g in two["grads"][0]]), torch.cat([g.flatten() for g in one["grads"][0]]))
    assert first < 1e-4, first
    for k, v in two["state"].items():
        if v.is_floating_point():
            assert off(v, one["state"][k]) < 1e-2, k
