"""The device and the precision, decided in one place for training, evaluation and the benchmark.

CUDA where it is (unless DeepSpeed's accelerator is forced to the CPU), with timm's GPU flags; `auto` precision is
the paper's mixed precision where the hardware has it; `autocast` is the one context every forward pass runs under
(timm's `--amp`: weights stay fp32); `deepspeed_precision` is the same choice in DeepSpeed's config.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import torch

from rsb.paramfile import ConfigError

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def use_cuda() -> bool:
    """Train and evaluate on CUDA where it is, unless DeepSpeed's accelerator is forced to the CPU
    (DS_ACCELERATOR=cpu), so that DeepSpeed, the model and the data agree on one device."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def device_for(local_rank: int) -> torch.device:
    if use_cuda():
        torch.cuda.set_device(local_rank)
        # as timm's train.py and validate.py run on a GPU: cuDNN picks its fastest kernels, matmuls in TF32
        # (NVIDIA_TF32_OVERRIDE=0 turns TF32 off for a process, as the fp32 parity test does on both sides)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def auto_precision(cuda: bool | None = None, cuda_bf16: bool | None = None, flags: set[str] | None = None) -> str:
    """The paper's mixed precision where the hardware has it: bf16 on GPUs that support it, fp16 before Ampere; on a
    CPU bf16 only with native bf16 instructions (AVX512-BF16 or AMX). `torch.ops.mkldnn._is_mkldnn_bf16_supported()`
    is True on any AVX-512 CPU, also where bf16 is emulated and 1.3-3.3x slower than fp32 (measured, DESIGN.md).
    The arguments are for tests; by default they are read from this machine."""
    cuda = use_cuda() if cuda is None else cuda
    if cuda:
        return "bf16" if (torch.cuda.is_bf16_supported() if cuda_bf16 is None else cuda_bf16) else "fp16"
    flags = cpu_flags() if flags is None else flags
    return "bf16" if any(f in flags for f in NATIVE_BF16_FLAGS) else "fp32"


def checked_precision(precision: str, device: torch.device) -> str:
    """`auto` resolved and the choice checked against the device; `AUTOCAST[...]` of it is the autocast dtype."""
    precision = auto_precision() if precision == "auto" else precision
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError(
            "train.precision = fp16 on the CPU: fp16 trains with a loss scaler, which timm's train.py makes on CUDA "
            "only, so no reference run exists to equal; use bf16 or fp32"
        )
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"train.precision=bf16 is not supported on {torch.cuda.get_device_name(device)}; "
            "use fp16 (V100 and older) or fp32"
        )
    return precision


def autocast(device: torch.device, dtype: torch.dtype | None):
    """timm's `--amp` around a forward pass: autocast to `dtype`, or nothing for fp32."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def deepspeed_precision(precision: str) -> dict:
    """DeepSpeed's side of the same choice: its `torch_autocast` (fp32 weights, as timm's --amp), never its fp16/bf16
    modes (those keep half-precision weights)."""
    dtype = AUTOCAST[precision]
    return {
        "torch_autocast": {
            "enabled": dtype is not None,
            "dtype": str(dtype).removeprefix("torch.") if dtype else "bfloat16",
        }
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()} x{torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"cpu x{torch.get_num_threads()} threads"
