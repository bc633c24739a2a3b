"""gpu: the GPU check. Every test here is one function parametrized by `device`: its CPU case runs in the suite (the
slower ones under `slow`), its CUDA case under the `gpu` marker where a CUDA device is found (bench/gpu.sh on a lent
GPU machine). Only the device differs, so each test's logic, fixtures, tolerances and the reference's device handling
(tests/timm_reference.py) are proven here before a GPU ever runs them: the GPU machine is lent rarely and briefly.

The stages run in subprocesses with DS_ACCELERATOR=<device> (the rest of the suite pins the CPU), against train.py's
or validate.py's assembly on the same device. Ours runs 1 process x 1 micro-batch of 16 against train.py's 1 process
of 16 (or 2 x 8 against 2 x 8): the same batches, one epoch of 10 updates, train.py's prefetcher path on both devices.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import ROOT, clean_env, run_if
from test_evaluate import differences, validate_py
from test_train import PARITY, REORDERED, assert_same_run, launch, off, params_file, reference_run

from rsb.io import save_weights

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, run_if(min_gpus=1)])
CUDA_2 = pytest.param("cuda", marks=[pytest.mark.gpu, run_if(min_gpus=2)])

# one epoch of 10 updates: warmup 240 of A1's 600 epochs = 4 updates, then the cosine (the CPU one-epoch tests' shape;
# PARITY's 120 is for two epochs). The prefetcher set, not `auto`: the GPU's path on both devices.
ONE_GPU = {
    **PARITY,
    "train.micro_batch": 16,
    "scale.min_epochs": 1,
    "train.eval_every": 1,
    "recipes.a1.warmup_epochs": 240,
    "train.prefetcher": True,
}
# TF32 off in this process and every process it starts (the reference's fork server included): fp32 then means fp32
# on both sides, and what remains between them is the order cuDNN's (autotuned) kernels sum in. No effect on the CPU.
os.environ["NVIDIA_TF32_OVERRIDE"] = "0"


def cuda_index(device: str) -> str:
    """A device string that carries its index, as every CUDA device object here does."""
    return "cuda:0" if device == "cuda" else device


def ran_on(run_file, device: str) -> None:
    """The run's own record of its device: the card's name on CUDA, `cpu: <model>` on the CPU."""
    name = json.loads(run_file.read_text())["tags"]["rsb.device"]
    assert name.startswith("cpu") == (device == "cpu"), f"asked for {device}, ran on {name}"


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])  # cpu: 11 s, CI runs it
def test_fp32_equals_train_py_on_the_same_device(tmp_path, prepared, extracted, device):
    """fp32 (TF32 off on CUDA): lr, loss and every gradient tensor per update, final weights and BatchNorm
    statistics, val top-1, at the tolerance for sums in another order (REORDERED: on CUDA the two processes'
    autotuned kernels); a missing factor or a wrong draw is off by ~0.5-1 (tests/test_train.py)."""
    p = params_file(tmp_path, prepared, ONE_GPU)
    ours = launch(tmp_path, p, 1, accelerator=device)
    theirs = reference_run(p, extracted, 1, 1, ONE_GPU, "fp32", device=device)
    assert_same_run(ours, theirs, updates=10, tol=REORDERED)
    run = json.loads((tmp_path / "runs/test_resnet-a1.json").read_text())
    assert run["resolved"]["train"]["precision"] == "fp32" and run["resolved"]["train"]["prefetcher"] is True
    ran_on(tmp_path / "runs/test_resnet-a1.json", device)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_bf16_autocast_equals_train_py_amp(tmp_path, prepared, extracted, device):
    """bf16: every convolution's output is bf16 during training (a forward hook in the stage's process); the same
    updates and lrs as train.py --amp --amp-dtype bfloat16 on the same device, and gradients and weights within 1e-2
    of it, while train.py with a 2x loss or without autocast is outside (the CPU test's bound, tests/test_train.py).
    On the CPU, bf16 autocast runs where the CPU lacks native bf16 too (emulated: slower, the same numbers)."""
    cfg = {**ONE_GPU, "train.precision": "bf16"}
    p = params_file(tmp_path, prepared, cfg)
    ours = launch(tmp_path, p, 1, accelerator=device, CONV_DTYPES_OUT=str(tmp_path / "dtypes.json"))
    assert json.loads((tmp_path / "dtypes.json").read_text()) == ["torch.bfloat16"], "autocast was not on"
    ran_on(tmp_path / "runs/test_resnet-a1.json", device)

    def distance(theirs) -> tuple[float, float]:
        assert len(ours["grads"]) == len(theirs.log) == 10, "the same number of updates"
        assert ours["lr"] == pytest.approx([u["lr"] for u in theirs.log], rel=1e-12)
        g = max(off(a, b) for x, u in zip(ours["grads"], theirs.log) for a, b in zip(x, u["grads"]))
        w = max(
            float((v - theirs.state[k]).abs().max() / theirs.state[k].abs().max().clamp_min(1e-12))
            for k, v in ours["state"].items()
            if v.is_floating_point() and "running" not in k
        )
        return g, w

    g, w = distance(reference_run(p, extracted, 1, 1, cfg, "bf16", device=device))
    assert g < 1e-2 and w < 1e-2, (g, w)
    g2, w2 = distance(reference_run(p, extracted, 1, 1, cfg, "bf16", loss_scale=2.0, device=device))
    assert g2 > 0.1 and w2 > 0.1, "a 2x gradient would pass"
    g32, w32 = distance(reference_run(p, extracted, 1, 1, cfg, "fp32", device=device))
    assert g32 > 0.1 and w32 > 0.1, "a skipped autocast would pass"


NO_CPU_SCALER = (
    "train.py makes its fp16 loss scaler on CUDA only (`if device.type in ('cuda',) and amp_dtype == "
    "torch.float16`): on the CPU its fp16 run skips no update, so there is no skipping to compare with"
)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.skip(reason=NO_CPU_SCALER)), CUDA])
def test_fp16_loss_scaler_skips_the_overflows_train_py_skips(tmp_path, prepared, extracted, device):
    """fp16 (pre-Ampere GPUs): DeepSpeed's torch_autocast GradScaler against train.py's NativeScaler, both started
    at 2^24 so that the first updates overflow: the same updates skipped, the same unscaled gradients handed to the
    optimizer at the others, the same lr schedule (it steps through skipped updates on both sides)."""
    cfg = {**ONE_GPU, "train.precision": "fp16"}
    p = params_file(tmp_path, prepared, cfg)
    ours = launch(tmp_path, p, 1, accelerator=device, INIT_SCALE=str(2.0**24))
    theirs = reference_run(p, extracted, 1, 1, cfg, "fp16", device=device, init_scale=2.0**24)
    ran = [u["grads"] for u in theirs.log if u["grads"] is not None]
    assert 0 < len(ran) < len(theirs.log), f"{len(theirs.log) - len(ran)} of {len(theirs.log)} updates overflowed"
    assert len(ours["grads"]) == len(ran) == theirs.steps, "the same number of optimizer steps ran"
    assert ours["lr"] == pytest.approx([u["lr"] for u in theirs.log], rel=1e-12)
    for n, (mine, them) in enumerate(zip(ours["grads"], ran), 1):
        worst = max(off(a, b) for a, b in zip(mine, them))
        assert worst < 1e-2, f"step {n}: off by {worst:.2e}"  # fp16 rounding in two processes' kernels


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_evaluate_on_the_device_equals_validate_py_there(tmp_path, prepared, extracted, device):
    """The evaluate stage on `device` (fp32) records where it ran, and its every number (val, ReaL, V2; top-1,
    top-5, counts) is timm's validate.py on the same weights on the same device: exactly on the CPU, within one image
    on CUDA (cuDNN's autotuned kernels may flip a near-tie). Batch 24 leaves a partial last batch."""
    p = params_file(tmp_path, prepared, {"evaluate.batch_size": 24})
    torch.manual_seed(0)
    (tmp_path / "models").mkdir()
    save_weights(
        tmp_path / "models/test_resnet-a1.safetensors", timm.create_model("test_resnet", num_classes=20).state_dict()
    )
    out = subprocess.run(
        [sys.executable, "-m", "stages.evaluate", "--arch", "test_resnet", "--recipe", "a1", "--params", str(p)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(RSB_TRACKING="off", DS_ACCELERATOR=device),
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ours = json.loads((tmp_path / "metrics/eval/test_resnet-a1.json").read_text())
    assert ours["device"].startswith("cpu") == (device == "cpu"), f"asked for {device}, ran on {ours['device']}"
    theirs = validate_py(tmp_path, extracted, "fp32", recipe="a1", device=cuda_index(device))
    assert differences(ours, theirs, images=0 if device == "cpu" else 1) == []


INDEPENDENT_PEAK = """
import json, resource, sys
import timm, torch
device = torch.device("cuda", 0) if sys.argv[1] == "cuda" else torch.device("cpu")
model = timm.create_model("resnet18").eval().to(device).to(memory_format=torch.channels_last)
x = torch.randn(8, 3, 64, 64, device=device).contiguous(memory_format=torch.channels_last)
with torch.inference_mode():
    for _ in range(3):
        model(x)
peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resource.getrusage(0).ru_maxrss * 1024
print(json.dumps({"peak_mem_mb": peak / 2**20}))
"""
BENCHMARK = """
import json, sys, timm, torch
from rsb import profiling
device = torch.device("cuda", 0) if sys.argv[1] == "cuda" else torch.device("cpu")
print(json.dumps(profiling.throughput(timm.create_model("resnet18"), 8, 64, device, None, True, 1, 2)))
"""


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_benchmark_peak_memory_equals_an_independent_measurement(device):
    """The benchmark's peak memory (CUDA: the allocator's max_memory_allocated; CPU: the process's ru_maxrss) is
    what a fresh process running the same model, batch and layout with nothing of rsb measures, within 10%: a peak
    reset after the forward passes (only what stays allocated), a unit slip or another device's number is far off
    (measured on the CPU: 782 MB against 781 MB, 2026-12-04)."""
    results = []
    for code in (BENCHMARK, INDEPENDENT_PEAK):
        out = subprocess.run(
            [sys.executable, "-c", code, device],
            cwd=ROOT,
            env=clean_env(DS_ACCELERATOR=device),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ours, independent = results
    assert ours["peak_mem_kind"].startswith("cuda" if device == "cuda" else "cpu"), ours["peak_mem_kind"]
    assert abs(ours["peak_mem_mb"] - independent["peak_mem_mb"]) <= 0.1 * independent["peak_mem_mb"], (
        ours["peak_mem_mb"],
        independent["peak_mem_mb"],
    )


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA_2])
def test_two_processes_equal_train_py_on_two_processes(tmp_path, prepared, extracted, device):
    """Two processes through rsb.launch -> deepspeed (NCCL on two GPUs, gloo on the CPU) against train.py on two
    processes of the same device kind (DDP over NCCL or gloo), fp32 with TF32 off: everything assert_same_run
    compares, over one epoch, at REORDERED (two GPUs' kernels and all-reduce order)."""
    cfg = {**ONE_GPU, "train.micro_batch": 8, "train.devices": 2}
    p = params_file(tmp_path, prepared, cfg)
    ours = launch(tmp_path, p, 2, accelerator=device)
    theirs = reference_run(p, extracted, 2, 1, cfg, "fp32", device=device)
    assert_same_run(ours, theirs, updates=10, tol=REORDERED)
    ran_on(tmp_path / "runs/test_resnet-a1.json", device)
