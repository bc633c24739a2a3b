"""Benchmarks: each script's docstring says what it measures; BENCHMARKS.md records the numbers."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch(prefix: str) -> Path:
    """A temp folder for one benchmark's data and runs, removed when the process exits (normally, on an error or on
    SystemExit): a benchmark leaves nothing in /tmp (the GPU rehearsal in every CI run left two folders before)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    return work
