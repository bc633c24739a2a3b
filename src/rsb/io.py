"""Files the stages write and read back: outputs written atomically (write, then rename), so a killed stage never
leaves half a file; what is read back is checked (JSON named on a parse error, weights readable and finite); no
output may overlap an input, and a folder is removed only when the project's own marker shows it created it."""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rsb.errors import InputError


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


class NoRoom(InputError):
    """A write that the disk, the quota or a file-size limit refused: what was published before is kept."""


NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how torch's and safetensors' writers report the same refusal (no errno on the exception)
NO_ROOM_TEXT = re.compile(r"No space left|Disk quota|File too large|os error (28|122|27)\b|unexpected pos \d+ vs \d+")


def no_room(e: BaseException) -> bool:
    """Whether `e` is a write refused for space: ENOSPC, EDQUOT, EFBIG (RLIMIT_FSIZE), as an OSError or as torch's
    stream writer and safetensors report it."""
    return (isinstance(e, OSError) and e.errno in NO_ROOM_ERRNOS) or bool(NO_ROOM_TEXT.search(str(e)))


def why_no_room(e: BaseException) -> str:
    """The refusal in words: the OS's own (No space left on device, ...), or what a writer's opaque message means."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    for words in ("No space left on device", "Disk quota exceeded", "File too large"):
        if words in text:
            return words
    return "the write was refused: a full disk, a quota or a file-size limit"


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def save_weights(path: Path, state_dict: dict) -> None:
    """A model's weights as safetensors (no pickle: loading them runs no code; timm reads them), atomically; a disk
    that refuses them is one NoRoom line naming the file and the bytes needed (the partial file is removed)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    try:
        with atomic(path) as tmp:
            save_file(tensors, str(tmp))
    except Exception as e:
        if not no_room(e):
            raise
        need = sum(t.numel() * t.element_size() for t in tensors.values())
        raise NoRoom(
            f"{path}: the weights file could not be written ({why_no_room(e)}): it needs about "
            f"{megabytes(need)} in {path.parent}; free space (or raise the quota or file-size limit) and rerun: the "
            "training resumes from its last checkpoint"
        ) from None


def load_weights(path: Path, what: str = "weights") -> dict:
    """A safetensors weights file, every floating tensor finite; one InputError naming the file otherwise."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file; run the stage that writes it (`dvc repro`) or fix the path")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - truncated, not safetensors, a pickle renamed: the same problem
        raise InputError(
            f"{path}: not a readable safetensors {what} file ({type(e).__name__}: {str(e)[:120]}); "
            "restore it (`dvc checkout`) or rerun the stage that writes it"
        ) from None
    check_finite(state, path)
    return state


def check_finite(state: dict, path: Path | str) -> None:
    """Weights with a NaN or an infinity would train or score garbage without a word: refused where they enter."""
    import torch

    for k, v in state.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise InputError(
                f"{path}: tensor {k} holds NaN or infinite values; these weights cannot be used "
                "(retrain, or use another file)"
            )


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file the project wrote (or a user gave), named on a parse error instead of a decoder traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: not text ({e.reason}); {what or 'restore it or rerun the stage that writes it'}"
        ) from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{path}: not valid JSON ({e.msg}, line {e.lineno}); "
            f"{what or 'restore it (git / dvc checkout) or rerun the stage that writes it'}"
        ) from None


def _real(p: Path) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def refuse_overlap(outputs: dict[str, Path], inputs: dict[str, Path]) -> None:
    """Refuse, before any work, an output that equals, contains or lies inside an input (symlinks resolved): a
    stage must never write over, or remove, what it reads. Keys name the params key or file for the message."""
    for okey, out in outputs.items():
        o = _real(out)
        for ikey, inp in inputs.items():
            i = _real(inp)
            if o == i or i in o.parents or o in i.parents:
                how = "is" if o == i else "lies inside" if i in o.parents else "contains"
                raise InputError(
                    f"{okey} = {out}: {how} the input {ikey} = {inp}; a stage never writes where its "
                    f"inputs are: set {okey} to a folder outside {inp}"
                )


MARKER = ".rsb-output"


def mark(folder: Path, stage: str) -> None:
    """Record in `folder` that `stage` created it, so a later run may replace it."""
    (Path(folder) / MARKER).write_text(json.dumps({"written_by": stage}) + "\n")


def owned(folder: Path, stage: str, legacy: tuple[str, ...] = ()) -> bool:
    """True if `stage` created `folder` (its marker, or for outputs of older versions all the `legacy` files)."""
    folder = Path(folder)
    try:
        return json.loads((folder / MARKER).read_text()).get("written_by") == stage
    except (OSError, ValueError, AttributeError):
        return bool(legacy) and all((folder / f).is_file() for f in legacy)


def replace_folder(new: Path, out: Path, stage: str, key: str, legacy: tuple[str, ...] = ()) -> None:
    """Move the finished folder `new` onto `out`; an existing `out` is removed only if `stage` created it (or it is
    empty); anything else there is the user's: refused, untouched."""
    check_replaceable(out, stage, key, legacy)
    if Path(out).exists():
        shutil.rmtree(out)
    Path(new).rename(out)


def check_replaceable(out: Path, stage: str, key: str, legacy: tuple[str, ...] = ()) -> None:
    """`out` is absent, empty, or was created by `stage`: called before any work, and again before replacing."""
    out = Path(out)
    if out.is_symlink() or out.is_file():
        raise InputError(
            f"{key} = {out}: is a {'symbolic link' if out.is_symlink() else 'file'}, not a folder this "
            f"stage wrote; set {key} to a new folder"
        )
    if out.exists():
        if not (owned(out, stage, legacy) or not any(out.iterdir())):
            raise InputError(
                f"{key} = {out}: exists and was not written by {stage} (no {MARKER}); move it away or "
                f"set {key} to a new folder"
            )


def sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks (a checkpoint or a weights file may be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_folder(out: Path, owner: str, key: str, legacy: tuple[str, ...], write) -> dict:
    """`write(tmp)` into a fresh sibling folder, then onto `out`: an existing `out` is replaced only if `owner` (a
    stage) wrote it (its marker, or the summary file of an older version) or it is empty; a folder of the user's
    (real archives at data.raw, say) is refused before anything is generated, untouched."""
    check_replaceable(out, owner, key, legacy)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        mark(tmp, owner)
        summary = write(tmp)
        replace_folder(tmp, out, owner, key, legacy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary
