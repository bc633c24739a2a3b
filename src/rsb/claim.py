"""A node shared by several trainings at once: each claims a free slot of its devices (train.slots).

With `train.slots: N` (N >= 1) the node's devices are N slots: its GPUs (CUDA_VISIBLE_DEVICES, else every GPU
`nvidia-smi -L` lists) in N equal groups, or on a machine without GPUs its cores (this process's affinity) in N
equal groups. `rsb.launch` claims the first free slot before it starts anything, by an exclusive `flock` on
`<slot dir>/slot<k>.lock` (RSB_SLOT_DIR, else <tmp>/rsb-slots-<uid>: one per node and user, outside every project
copy, so `dvc queue start -j N`'s workspaces share it). The lock is held by the launcher and inherited by every
process of the training: it ends when the last of them exits, however it exits (a crash, `kill -9`), so a slot is
never leaked. The training then sees only its slot: CUDA_VISIBLE_DEVICES and DeepSpeed's `--include`, or the CPU
affinity of every process (torch's threads follow it). No free slot: one line naming the holders, nothing started.
Standard library only (rsb.launch imports it before anything heavy).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

from rsb.errors import RsbError


class NoFreeSlot(RsbError):
    """Every slot of this node is held by another training."""


@dataclass(frozen=True)
class Claim:
    index: int  # the slot
    slots: int  # train.slots
    fd: int  # the locked file: keep it open (and inherited) for the training's life
    gpus: tuple[str, ...] = ()  # the slot's GPUs (as CUDA_VISIBLE_DEVICES names them)
    cores: tuple[int, ...] = ()  # without GPUs: the slot's cores

    def describe(self) -> str:
        what = f"GPUs {','.join(self.gpus)}" if self.gpus else f"cores {','.join(map(str, self.cores))}"
        return f"slot {self.index} of {self.slots} ({what})"


def slot_dir() -> Path:
    return Path(os.environ.get("RSB_SLOT_DIR") or Path(tempfile.gettempdir()) / f"rsb-slots-{os.getuid()}")


def node_gpus(env=os.environ) -> list[str]:
    """The GPUs this node offers: CUDA_VISIBLE_DEVICES if set, else those `nvidia-smi -L` lists; none without one."""
    if env.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if out.returncode == 0:
            return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]
    return []


def claim(slots: int, devices: int, env=os.environ) -> Claim:
    """The first free slot of `slots`, locked; its devices. `devices`: train.devices, GPUs a slot must hold."""
    gpus = node_gpus(env)
    cores = sorted(os.sched_getaffinity(0))
    pool: list = gpus or cores
    per = len(pool) // slots
    if gpus and per < devices:
        raise NoFreeSlot(
            f"train.slots={slots}: {len(gpus)} GPU(s) make slots of {per}, but train.devices={devices}; lower "
            "train.slots or train.devices"
        )
    if per < 1:
        raise NoFreeSlot(f"train.slots={slots}: this node has {len(pool)} core(s); lower train.slots")
    d = slot_dir()
    d.mkdir(parents=True, exist_ok=True)
    for k in range(slots):
        fd = os.open(d / f"slot{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {os.getcwd()}\n".encode())
        os.set_inheritable(fd, True)  # held through exec and by the training's processes
        if gpus:
            return Claim(k, slots, fd, gpus=tuple(gpus[k * per : k * per + devices]))
        return Claim(k, slots, fd, cores=tuple(cores[k * per : (k + 1) * per]))
    holders = "; ".join(f"slot {k}: {_holder(d / f'slot{k}.lock')}" for k in range(slots))
    raise NoFreeSlot(
        f"train.slots={slots}: every slot under {d} is held ({holders}); run at most {slots} trainings at once on "
        f"this node (`dvc queue start -j {slots}`), or raise train.slots"
    )


def _holder(lock: Path) -> str:
    try:
        pid, _, where = lock.read_text().strip().partition(" ")
    except OSError:
        return "unknown"
    return f"pid {pid} in {where}" if pid else "unknown"


def apply(c: Claim, env: MutableMapping[str, str]) -> None:
    """This process (and so every process it starts) uses only the slot: its cores, or its GPUs."""
    env["RSB_SLOT"] = c.describe()
    if c.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(c.gpus)
    else:
        os.sched_setaffinity(0, c.cores)
