"""DeepSpeed for every run: config from the resolved recipe, initialize, and rank helpers.

One process on a laptop CPU and 8 GPUs x N nodes go through the same `deepspeed.initialize`. The recipe's math is
kept: no ZeRO (LAMB's trust ratio is per tensor), the timm scheduler stays out of DeepSpeed (it would be stepped
with the wrong unit), and mixed precision is `torch_autocast` (fp32 weights; bf16, or fp16 with a GradScaler), which
is what timm's `--amp` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rsb.config import Resolved
from rsb.hardware import deepspeed_precision
from rsb.net import free_port


def init(timeout_s: int = 1800) -> tuple[int, int, int]:
    """Join (or, outside a launcher, create) the process group; returns (rank, local_rank, world_size)."""
    import datetime

    import deepspeed

    if "RANK" not in os.environ:  # a plain `python -m stages.train` or a test: a world of one
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    if not torch.distributed.is_initialized():
        # The timeout bounds how long a rank waits for a peer that died: it fails instead of hanging forever.
        deepspeed.init_distributed(verbose=False, timeout=datetime.timedelta(seconds=timeout_s))
        release_shm()
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), torch.distributed.get_world_size()


def shm_segment(rank: int) -> Path:
    """The POSIX shared-memory segment DeepSpeed's CPU shm op creates for a rank (its csrc/cpu/comm/shm.cpp)."""
    return Path("/dev/shm") / (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank}"
    )


def release_shm() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    On the CPU, when all ranks share a node, DeepSpeed's init creates a 66 MB POSIX shared-memory segment per rank
    for its shm all-reduce (used only by `inference_all_reduce`; training reduces through torch.distributed) and
    never unlinks it: every multi-process launch left 132 MB of RAM in /dev/shm until reboot (18 GB on a 24 GB test
    machine after a day of runs; the next test suite ran under memory pressure, its slowest test 3x slower). Each
    rank maps its peers' segments inside init (it waits until they exist), so after a barrier every rank unlinks its
    own name: the mappings stay valid while the processes live, and the memory is freed when they exit, however
    they exit. The condition is the one DeepSpeed's op uses (the op loaded, LOCAL_SIZE equal to the world), the same
    on every rank.
    """
    from deepspeed.comm import comm

    world = torch.distributed.get_world_size()
    if world < 2 or getattr(comm.cdb, "shm_comm_op", None) is None or os.environ.get("LOCAL_SIZE") != str(world):
        return
    torch.distributed.barrier()
    shm_segment(torch.distributed.get_rank()).unlink(missing_ok=True)


def set_threads(threads: int) -> int:
    """Torch threads per process: the launcher does not set OMP_NUM_THREADS, and N processes x all cores thrash."""
    if threads == 0:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        threads = max(1, len(os.sched_getaffinity(0)) // local)  # this process's cores (a slot's: rsb.claim)
    torch.set_num_threads(threads)
    return threads


def ds_config(r: Resolved) -> dict:
    """The DeepSpeed config for a resolved recipe (logged with the run)."""
    return {
        "train_batch_size": r.batch_size,  # DeepSpeed checks batch = micro x accumulation x world
        "train_micro_batch_size_per_gpu": r.micro_batch,
        "gradient_accumulation_steps": r.grad_accum,
        "zero_optimization": {"stage": r.train.zero_stage},  # > 0 only with an element-wise optimizer (config)
        "gradient_clipping": 0.0,  # timm's LAMB clips the global grad norm itself (max_grad_norm=1.0)
        **deepspeed_precision(r.train.precision),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


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
