"""A training process that makes no progress says where it is stuck, instead of waiting without end.

A rank beats the watchdog at every micro-batch (a batch delivered and stepped) and around each evaluation and
checkpoint. When `train.stall_s` seconds pass without a beat, a thread of its own writes every thread's stack to
stderr (faulthandler: the launcher's log), then one line — `error: rank R of W: no progress for N s after update U;
...` — and ends the process with EXIT_STALLED. Its peers, waiting for it in a collective, stall too and end the same
way within the same time (a rank that was stopped, by SIGSTOP or a hung file system, cannot run its own watchdog:
its peers' name the update it stopped at); the launcher then stops the rest. The run resumes from its last
checkpoint with the same command.

The other stages' main processes are watched the same way (`stage`): evaluate and benchmark beat per batch and take
train.stall_s, prepare beats per chunk of images checked and takes STAGE_STALL_S (it reads no training key).
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

EXIT_STALLED = 75  # documented in RELIABILITY.md: a stall, not a crash (EX_TEMPFAIL: try again)
STAGE_STALL_S = 1800  # prepare's: a chunk of images takes seconds


class Watchdog:
    def __init__(self, seconds: float, where: str, unit: str = "update", key: str = "train.stall_s"):
        self.seconds, self.where, self.unit, self.key = seconds, where, unit, key
        self.last, self.update = time.monotonic(), 0
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def beat(self, update: int | None = None) -> None:
        self.last = time.monotonic()
        if update is not None:
            self.update = update

    def __enter__(self) -> Watchdog:
        if self.seconds > 0:
            self.beat()
            self.thread = threading.Thread(target=self._watch, name="rsb-watchdog", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(min(5.0, self.seconds / 4)):
            idle = time.monotonic() - self.last
            if idle > self.seconds:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                sys.stderr.write(
                    f"error: {self.where}: no progress for {idle:.0f} s ({self.key} = {self.seconds:g}) after "
                    f"{self.unit} {self.update}; every thread's stack is above. Check the node (a stopped or swapping "
                    "process, a hung file system, a dead peer) and rerun: training resumes from its last checkpoint\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_STALLED)


_stage: Watchdog | None = None


def beat(at: int | None = None) -> None:
    """Progress of the stage this process runs (a batch predicted, a chunk of images checked), for its watchdog."""
    if _stage is not None:
        _stage.beat(at)


@contextmanager
def stage(seconds: float, where: str, key: str = "train.stall_s") -> Iterator[Watchdog]:
    """A stage's main process, watched: `beat()` is its progress, counted in batches."""
    global _stage
    previous = _stage
    with Watchdog(seconds, where, "batch", key) as dog:
        _stage = dog
        try:
            yield dog
        finally:
            _stage = previous
