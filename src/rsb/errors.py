"""One error path for the whole project: an expected failure ends in one line

    error: <file or key>: <what is wrong>; <what to do>

and exit status 1, never a traceback (`RSB_DEBUG=1` shows it). Every project error class derives from `RsbError`;
an `OSError` (a file missing, unreadable, a port taken) is expected too and is named by its file. A failure inside a
DataLoader worker reaches the main process wrapped by torch ("Caught X in DataLoader worker process 0. Original
Traceback ..."): `message` unwraps it to the worker's own line, which names the file that failed.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable


class RsbError(Exception):
    """An expected failure; the message names the file or key, what is wrong and what to do."""


class InputError(RsbError, ValueError):
    """A file the project reads that cannot be used as it is (unparsable, non-finite weights, an input overlapping
    an output)."""


# A run that stopped on a signal after saving a checkpoint (rsb.stopping): not a failure, and not finished. The same
# command resumes it; rsb.launch's SLURM path requeues the job on it. Documented in RELIABILITY.md.
EXIT_STOPPED = 76


class Stopped(RsbError):
    """The run saved a checkpoint at an update and stopped, as a stop signal asked."""


EXPECTED = (RsbError, OSError)
_WRAPPED = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")
_LAST = re.compile(r"^[\w.]+: (.*)$")
# torch's DataLoader(timeout=...) gave up on a batch (rsb.loader.STALL_S)
_STALLED = re.compile(r"^DataLoader timed out after (\d+) seconds")


def expected(e: BaseException) -> bool:
    return isinstance(e, EXPECTED) or (isinstance(e, RuntimeError) and bool(_STALLED.match(str(e))))


def message(e: BaseException) -> str:
    """The one line to print for an expected failure."""
    text = str(e)
    if stalled := _STALLED.match(text):
        text = (
            f"train.workers: the loader workers delivered no batch in {stalled.group(1)} s (a worker that cannot "
            "hand its batch over, e.g. /dev/shm or memory full, never delivers it); check `df -h /dev/shm` and "
            "free memory, or set train.workers: 0 (evaluate.workers for evaluation)"
        )
    elif _WRAPPED.match(text):  # torch re-raises a worker's exception with the worker's traceback as its message
        last = text.rstrip().splitlines()[-1]
        m = _LAST.match(last)
        text = m.group(1) if m else last
    elif isinstance(e, OSError) and not isinstance(e, RsbError) and e.filename:
        text = f"{e.filename}: {e.strerror or type(e).__name__}; check the path and its permissions"
    return " ".join(text.split("\n")).strip() or type(e).__name__


def run(main: Callable[[], object], where: str = "") -> None:
    """Run a command's `main`; an expected failure becomes one `error: ...` line and exit status 1. `where` (a
    training's rank) is appended; with it, an unexpected failure (a bug) is named in one line before its traceback,
    so the launcher's output says which rank failed and why."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("error: interrupted")
    except Stopped as e:
        print(f"stopped: {message(e)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STOPPED)
    except Exception as e:
        if expected(e):
            if os.environ.get("RSB_DEBUG") == "1":
                raise
            sys.exit(f"error: {message(e)}{f' [{where}]' if where else ''}")
        if where:
            print(f"error: {where} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise


def rank() -> str:
    """`rank R of W` of this process (the launcher's environment), for error lines."""
    return f"rank {os.environ.get('RANK', 0)} of {os.environ.get('WORLD_SIZE', 1)}"
