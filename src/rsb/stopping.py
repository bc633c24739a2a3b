"""Stop signals: a pre-emption or a time limit ends a training at its next update, saved, instead of losing the
epoch.

SIGTERM (what SLURM, Kubernetes and `kill` send first) and SIGUSR1 (what `srun --signal=USR1@N` sends N seconds
before the job's time limit: train.slurm_signal_s) only set a flag in the rank that receives them; a second signal
during the save finds the flag set and changes nothing. After every update the ranks agree (one all-reduce of two
flags on a gloo group, so no device sync) on whether any rank was signalled and whether the checkpoint schedule
(train.checkpoint_every, counted in updates or, on rank 0's clock, in minutes) is due; all of them then save the
same checkpoint at that update (rsb.checkpoint: published only once complete), and on a signal they stop with
`errors.EXIT_STOPPED`. rsb.launch forwards a stop signal it receives to every rank; the same command resumes.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

from rsb.config import parse_every

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """SIGTERM and SIGUSR1 set `received` (the first one's name) in this process while the block runs."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is None:  # a second signal (during the save, say) changes nothing
            self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            # stopping (the checkpoint is saved): further stop signals are ignored until the process has exited, so
            # DeepSpeed's launcher, ending the other ranks with SIGTERM as the first one exits, cannot cut this
            # rank's MLflow status or its last line
            signal.signal(s, signal.SIG_IGN if self.received else h)


class Agreement:
    """What every rank decides together after an update: save now, and stop after saving."""

    def __init__(self, signals: StopSignals, every: int | str):
        self.signals = signals
        self.updates, self.seconds = parse_every(every)
        self.last = time.monotonic()
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # a CPU group for two flags per update: no CUDA sync on the NCCL group. Every rank creates it (collective)
        self.group: Any = dist.new_group(backend="gloo") if self.world > 1 else None
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def decide(self, num_updates: int) -> tuple[bool, bool]:
        """(save, stop) after update `num_updates`, the same on every rank."""
        stop = self.signals.received is not None
        timed = self.rank0 and self.seconds > 0 and time.monotonic() - self.last >= self.seconds
        if self.world > 1:
            flags = torch.tensor([int(stop), int(timed)])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            stop, timed = bool(flags[0]), bool(flags[1])
        counted = self.updates > 0 and num_updates % self.updates == 0
        return stop or timed or counted, stop

    def saved(self) -> None:
        self.last = time.monotonic()

    def gather(self, obj) -> list:
        """Every rank's `obj` (a checkpoint inside an epoch holds every rank's random streams)."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out
