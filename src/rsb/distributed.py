"""DeepSpeed for every run: config from the resolved recipe, initialize, and rank helpers.

One process on a laptop CPU and 8 GPUs x N nodes go through the same `deepspeed.initialize`. The recipe's math is
kept: no ZeRO (LAMB's trust ratio is per tensor), the timm scheduler stays out of DeepSpeed (it would be stepped
with the wrong unit), and mixed precision is `torch_autocast` (fp32 weights; bf16, or fp16 with a GradScaler), which
is what timm's `--amp` does.
"""
from __future__ import annotations

import os
import torch

from rsb.config import Resolved, use_cuda
from rsb.launch import free_port

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def init(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Join (or, outside a launcher, create) the process group; returns (rank, local_rank, world_size)."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m stages.train` or a test: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        # The timeout bounds how long a rank waits for a peer that died: it fails instead of hanging forever.
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), torch.distributed.get_world_size()


def device_for(local_rank: int) -> torch.device:
    if use_cuda():
        torch.cuda.set_device(local_rank)
        # as timm's train.py and validate.py run on a GPU: cuDNN picks its fastest kernels, matmuls in TF32
        # (NVIDIA_TF32_OVERRIDE=0 turns TF32 off for a process, as the fp32 parity test does on both sides)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def set_threads(threads: int) -> int:
    """Torch threads per process: the launcher does not set OMP_NUM_THREADS, and N processes x all cores thrash."""
    if threads == 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        threads = max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)
    return threads


def ds_config(r: Resolved) -> dict:
    """The DeepSpeed config for a resolved recipe (logged with the run)."""
    dtype = AUTOCAST[r.train.precision]
    return {
        "train_batch_size": r.batch_size,  # DeepSpeed checks batch = micro x accumulation x world
        "train_micro_batch_size_per_gpu": r.micro_batch,
        "gradient_accumulation_steps": r.grad_accum,
        "zero_optimization": {"stage": r.train.zero_stage},  # > 0 only with an element-wise optimizer (config)
        "gradient_clipping": 0.0,  # timm's LAMB clips the global grad norm itself (max_grad_norm=1.0)
        "torch_autocast": {"enabled": dtype is not None,
                           "dtype": str(dtype).removeprefix("torch.") if dtype else "bfloat16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.precision=fp16 is not supported on the CPU (no fp16 autocast kernels for "
                         "convolutions there); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision=bf16 is not supported on {torch.cuda.get_device_name(device)}; "
                         "use fp16 (V100 and older) or fp32")


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, r: Resolved):
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(r))
    if engine.dp_world_size == 1 and r.train.zero_stage == 0:  # ZeRO's optimizer runs its own reduction path
        # DeepSpeed all-reduces even a world of one: it copies every gradient into flat buffers and back (5% of a
        # resnet18 step on the CPU, measured; bench/train_vs_bare.py). Summing over one rank is the identity.
        engine.enable_backward_allreduce = False
    return engine


def is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
