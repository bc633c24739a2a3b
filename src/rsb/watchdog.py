"""A training process that makes no progress says where it is stuck, instead of waiting without end.

A rank beats the watchdog at every micro-batch (a batch delivered and stepped) and around each evaluation and
checkpoint. When `train.stall_s` seconds pass without a beat, a thread of its own writes every thread's stack to
stderr (faulthandler: the launcher's log), then one line — `error: rank R of W: no progress for N s after update U;
...` — and ends the process with EXIT_STALLED. Its peers, waiting for it in a collective, stall too and end the same
way within the same time (a rank that was stopped, by SIGSTOP or a hung file system, cannot run its own watchdog:
its peers' name the update it stopped at); the launcher then stops the rest. The run resumes from its last
checkpoint with the same command.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time

EXIT_STALLED = 75  # documented in RELIABILITY.md: a stall, not a crash (EX_TEMPFAIL: try again)


class Watchdog:
    def __init__(self, seconds: float, where: str):
        self.seconds, self.where = seconds, where
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
                    f"error: {self.where}: no progress for {idle:.0f} s (train.stall_s = {self.seconds:g}) after "
                    f"update {self.update}; every thread's stack is above. Check the node (a stopped or swapping "
                    "process, a hung file system, a dead peer) and rerun: training resumes from its last checkpoint\n"
                )
                sys.stderr.flush()
                os._exit(EXIT_STALLED)
