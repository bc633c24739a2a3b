"""gpu: the stages on one CUDA GPU against train.py's assembly (tests/timm_reference.py) on the same GPU, in
subprocesses with DS_ACCELERATOR=cuda (the rest of the suite pins the CPU). Skipped, with the reason, where no CUDA
device is found; `bench/gpu.sh` runs these on a lent GPU machine (and its rehearsal imports them on the CPU).

Ours runs 1 process x 1 micro-batch of 16, train.py 1 process of 16: the same batches, one epoch of 10 updates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, clean_env, run_if
from test_train import PARITY, REORDERED, assert_same_run, launch, off, params_file, reference_run

pytestmark = [pytest.mark.gpu, run_if(min_gpus=1)]

ONE_GPU = {**PARITY, "train.micro_batch": 16, "scale.min_epochs": 1, "train.eval_every": 1}
# TF32 off in this process and every process it starts (the reference's fork server included): fp32 then means fp32
# on both sides, and what remains between them is the order cuDNN's (autotuned) kernels sum in
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"


def ours_on_gpu(tmp_path, p, **env) -> dict:
    return launch(tmp_path, p, 1, accelerator="cuda", **env)


def test_fp32_on_one_gpu_equals_train_py_on_the_same_gpu(tmp_path, prepared, extracted):
    """fp32 with TF32 off: lr, loss and every gradient tensor per update, final weights and BatchNorm statistics,
    val top-1, at the CPU's tolerance for sums in another order (REORDERED: the two processes' autotuned kernels);
    a missing factor or a wrong draw is off by ~0.5-1 (tests/test_train.py)."""
    p = params_file(tmp_path, prepared, ONE_GPU)
    ours = ours_on_gpu(tmp_path, p)
    theirs = reference_run(p, extracted, 1, 1, ONE_GPU, "fp32", device="cuda")
    assert_same_run(ours, theirs, updates=10, tol=REORDERED)
    run = json.loads((tmp_path / "runs/test_resnet-a1.json").read_text())
    assert run["resolved"]["train"]["precision"] == "fp32" and run["resolved"]["train"]["prefetcher"] is True


def test_bf16_autocast_on_gpu_equals_train_py_amp(tmp_path, prepared, extracted):
    """bf16: every convolution's output is bf16 during training (a forward hook in the stage's process), and the
    run is within 1e-2 of train.py --amp --amp-dtype bfloat16 on the same GPU, while train.py with a 2x loss or
    without autocast is outside it (the CPU test's bound, tests/test_train.py)."""
    cfg = {**ONE_GPU, "train.precision": "bf16"}
    p = params_file(tmp_path, prepared, cfg)
    ours = ours_on_gpu(tmp_path, p, CONV_DTYPES_OUT=str(tmp_path / "dtypes.json"))
    assert json.loads((tmp_path / "dtypes.json").read_text()) == ["torch.bfloat16"], "autocast was not on"

    def distance(theirs) -> tuple[float, float]:
        g = max(off(a, b) for x, u in zip(ours["grads"], theirs.log) for a, b in zip(x, u["grads"]))
        w = max(
            float((v - theirs.state[k]).abs().max() / theirs.state[k].abs().max().clamp_min(1e-12))
            for k, v in ours["state"].items()
            if v.is_floating_point() and "running" not in k
        )
        return g, w

    g, w = distance(reference_run(p, extracted, 1, 1, cfg, "bf16", device="cuda"))
    assert g < 1e-2 and w < 1e-2, (g, w)
    g2, w2 = distance(reference_run(p, extracted, 1, 1, cfg, "bf16", loss_scale=2.0, device="cuda"))
    assert g2 > 0.1 and w2 > 0.1, "a 2x gradient would pass"
    g32, w32 = distance(reference_run(p, extracted, 1, 1, cfg, "fp32", device="cuda"))
    assert g32 > 0.1 and w32 > 0.1, "a skipped autocast would pass"


def test_fp16_loss_scaler_skips_the_overflows_train_py_skips(tmp_path, prepared, extracted):
    """fp16 (pre-Ampere GPUs): DeepSpeed's torch_autocast GradScaler against train.py's NativeScaler, both started
    at 2^24 so that the first updates overflow: the same updates skipped, the same unscaled gradients handed to the
    optimizer at the others, the same lr schedule (it steps through skipped updates on both sides)."""
    cfg = {**ONE_GPU, "train.precision": "fp16"}
    p = params_file(tmp_path, prepared, cfg)
    ours = ours_on_gpu(tmp_path, p, INIT_SCALE=str(2.0**24))
    theirs = reference_run(p, extracted, 1, 1, cfg, "fp16", device="cuda", init_scale=2.0**24)
    ran = [u["grads"] for u in theirs.log if u["grads"] is not None]
    assert 0 < len(ran) < len(theirs.log), f"{len(theirs.log) - len(ran)} of {len(theirs.log)} updates overflowed"
    assert len(ours["grads"]) == len(ran) == theirs.steps, "the same number of optimizer steps ran"
    assert ours["lr"] == pytest.approx([u["lr"] for u in theirs.log], rel=1e-12)
    for n, (mine, them) in enumerate(zip(ours["grads"], ran), 1):
        worst = max(off(a, b) for a, b in zip(mine, them))
        assert worst < 1e-2, f"step {n}: off by {worst:.2e}"  # fp16 rounding in two processes' kernels


def test_evaluate_on_gpu_scores_what_the_cpu_scores(tmp_path, prepared):
    """The evaluate stage on CUDA (fp32) and on the CPU, on the same weights: val top-1 within one image."""
    p = params_file(tmp_path, prepared, {**ONE_GPU, "train.precision": "fp32"})
    ours_on_gpu(tmp_path, p)
    tops = {}
    for accelerator in ("cuda", "cpu"):
        out = subprocess.run(
            [sys.executable, "-m", "stages.evaluate", "--arch", "test_resnet", "--recipe", "a1", "--params", str(p)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=clean_env(RSB_TRACKING="off", DS_ACCELERATOR=accelerator),
        )
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        ev = json.loads((tmp_path / "metrics/eval/test_resnet-a1.json").read_text())
        tops[accelerator] = ev
        shutil.move(tmp_path / "metrics/eval/test_resnet-a1.json", tmp_path / f"eval-{accelerator}.json")
    n = tops["cpu"]["val/count"]
    assert tops["cuda"]["val/count"] == n and abs(tops["cuda"]["val/top1"] - tops["cpu"]["val/top1"]) <= 100 / n


def test_benchmark_peak_memory_comes_from_the_cuda_allocator():
    """profiling.throughput on CUDA reports torch.cuda.max_memory_allocated, at least the weights' size."""
    code = "\n".join(
        [
            "import json, timm, torch",
            "from rsb import profiling",
            "m = timm.create_model('resnet18')",
            "r = profiling.throughput(m, 8, 64, torch.device('cuda'), None, True, 1, 2)",
            "print(json.dumps({**r, 'weights_mb': sum(p.numel() * 4 for p in m.parameters()) / 2**20}))",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(DS_ACCELERATOR="cuda"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["peak_mem_kind"] == "cuda max_memory_allocated" and r["peak_mem_mb"] >= r["weights_mb"], r


@run_if(min_gpus=2)
def test_nccl_world_of_two_equals_one_gpu_accumulating(tmp_path, prepared):
    """Two GPUs through rsb.launch -> deepspeed (NCCL) against one GPU accumulating 2 micro-batches, fp32 with TF32
    off: the same micro-batches, so the same run up to reduction order (REORDERED, one epoch)."""
    cfg = {**ONE_GPU, "train.micro_batch": 8}
    (tmp_path / "one").mkdir()
    one = launch(tmp_path / "one", params_file(tmp_path / "one", prepared, cfg), 1, accelerator="cuda")
    (tmp_path / "two").mkdir()
    two = launch(
        tmp_path / "two", params_file(tmp_path / "two", prepared, {**cfg, "train.devices": 2}), 2, accelerator="cuda"
    )
    assert one["lr"] == two["lr"] and len(one["grads"]) == len(two["grads"]) == 10
    early, late, state = REORDERED
    for n, (a, b) in enumerate(zip(two["grads"], one["grads"]), 1):
        worst = max(off(x, y) for x, y in zip(a, b))
        assert worst <= (early if n <= 3 else late), f"update {n}: off by {worst:.2e}"
    for k, v in two["state"].items():
        if v.is_floating_point():
            assert off(v, one["state"][k]) <= state, k
