"""Writing the stages' declared outputs: atomically (write, then rename), so a killed stage never leaves half a file."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic(path: Path):
    """Yields a temporary path beside `path`; renames it onto `path` only if the block finishes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    with atomic(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def save_weights(path: Path, state_dict: dict) -> None:
    """A model's weights as safetensors (no pickle: loading them runs no code; timm reads them), atomically."""
    from safetensors.torch import save_file

    with atomic(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))


def load_weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a checkpoint or a weights file may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
