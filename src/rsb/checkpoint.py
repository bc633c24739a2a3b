"""Save and resume: DeepSpeed checkpoints (model + optimizer) plus client state (scheduler, epoch, history, run id).

Layout: checkpoints/<arch>-<recipe>/<digest>/{epoch<N>/, epoch<N>.<U>/, latest}: `epoch<N>` after N epochs,
`epoch<N>.<U>` U updates into the next one (train.checkpoint_every, or a stop signal: rsb.stopping). The newest
train.keep_checkpoints complete ones are kept; older ones go only after the new one is published. The digest covers
the resolved recipe (everything that changes the math), the training code and the library versions, so a changed
recipe or a code fix starts fresh beside the old run instead of resuming a different one.
`latest` is written only after every rank has finished writing its files, and atomically (write, then rename): a
checkpoint whose write was interrupted is never the one that is loaded. rsb.json records the sha256 of every file;
before DeepSpeed loads a checkpoint (with a full unpickler) each file must match its hash and load with
`torch.load(weights_only=True)`, so a truncated, edited or crafted checkpoint is refused, never executed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
from pathlib import Path

import torch.distributed as dist

from rsb import code
from rsb.distributed import barrier, is_main
from rsb.errors import RsbError
from rsb.io import NoRoom, megabytes, no_room, read_json, sha256, why_no_room


class CheckpointMismatch(RsbError, RuntimeError):
    """A checkpoint from another recipe or architecture."""


def resume_digest(recipe_digest: str, job: str = "rsb.trainer", src: Path = code.SRC) -> str:
    """What a checkpoint must match to be resumed: the resolved recipe, the training code (every module the job
    imports, rsb.code: `src` holds the package) and the library versions. A code fix (or a timm/torch upgrade)
    therefore trains afresh instead of resuming a finished run of the old code."""
    h = hashlib.sha256(recipe_digest.encode())
    for f in code.files(job, src):
        h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    for pkg in ("torch", "timm", "deepspeed"):
        h.update(md.version(pkg).encode())
    return h.hexdigest()[:16]


def run_dir(root: Path, name: str, digest: str) -> Path:
    return Path(root) / name / digest


def latest_tag(ckpt_dir: Path) -> str | None:
    f = Path(ckpt_dir) / "latest"
    tag = f.read_text().strip() if f.is_file() else None
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def peek(ckpt_dir: Path) -> dict:
    """The latest checkpoint's small metadata (digest, epoch, MLflow run id), without loading it."""
    tag = latest_tag(ckpt_dir)
    meta = Path(ckpt_dir) / str(tag) / "rsb.json"
    return read_json(meta) if tag and meta.is_file() else {}


TAG = re.compile(r"epoch(\d+)(?:\.(\d+))?")


def tag_for(epochs_done: int, position: int = 0) -> str:
    """The checkpoint after `epochs_done` epochs and `position` updates of the next."""
    return f"epoch{epochs_done}" + (f".{position}" if position else "")


def order(tag: str) -> tuple[int, int]:
    """Where a tag is in the run: (epochs done, updates into the next); (-1, -1) for a name not written here."""
    m = TAG.fullmatch(tag)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (-1, -1)


def save(engine, ckpt_dir: Path, tag: str, client_state: dict, keep: int = 1) -> None:
    """Collective: every rank must call it (DeepSpeed writes per-rank files). Once the new checkpoint is complete
    and published (`latest`), only the newest `keep` complete ones stay. A write the disk refuses (full, over quota,
    a file-size limit) removes its own partial folder and stops with one line; `latest` still names the previous
    checkpoint, which the rerun resumes."""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except Exception as e:
        if not no_room(e):
            raise
        _refused(ckpt_dir, tag, engine, e)
    barrier()
    if is_main():
        meta = {k: client_state.get(k) for k in ("digest", "epoch", "position", "mlflow_run_id")}
        meta["files"] = {f.name: sha256(f) for f in sorted((Path(ckpt_dir) / tag).iterdir()) if f.name != "rsb.json"}
        (Path(ckpt_dir) / tag / "rsb.json").write_text(json.dumps(meta))
        tmp = Path(ckpt_dir) / f".latest.{os.getpid()}"
        tmp.write_text(tag)
        os.replace(tmp, Path(ckpt_dir) / "latest")
        prune(Path(ckpt_dir), keep)
    barrier()


def prune(ckpt_dir: Path, keep: int) -> None:
    """After `latest` is published: the newest `keep` complete checkpoints up to it stay; everything else this
    module wrote goes (older ones, and the partial or unpublished folders of an interrupted write)."""
    newest = latest_tag(ckpt_dir)
    if newest is None:
        return
    tags = [d for d in ckpt_dir.iterdir() if d.is_dir() and TAG.fullmatch(d.name)]
    good = sorted(
        (d for d in tags if order(d.name) <= order(newest) and (d / "rsb.json").is_file()), key=lambda d: order(d.name)
    )
    kept = {d.name for d in good[-keep:]} | {newest}
    for d in tags:
        if d.name not in kept:
            shutil.rmtree(d, ignore_errors=True)


def _refused(ckpt_dir: Path, tag: str, engine, e: BaseException) -> None:
    """The new checkpoint did not fit: its own folder goes (never `latest`'s), and one line says what it needs."""
    ckpt_dir = Path(ckpt_dir)
    previous = latest_tag(ckpt_dir)
    if tag != previous:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    if previous:  # the same model and optimizer: the last checkpoint's size is the next one's
        need = sum(f.stat().st_size for f in (ckpt_dir / previous).iterdir())
    else:  # weights and the optimizer's two moments (Adam, LAMB), fp32
        need = 3 * sum(p.numel() * 4 for p in engine.module.parameters())
    kept = f"{previous} is kept and the rerun resumes from it" if previous else "no earlier checkpoint exists"
    raise NoRoom(
        f"{ckpt_dir}: the checkpoint {tag} could not be written ({why_no_room(e)}): it needs about "
        f"{megabytes(need)} there; its partial files were removed and {kept}. Free space (or raise the quota or "
        "file-size limit) and rerun"
    ) from None


def verify(tag_dir: Path) -> None:
    """Every file as it was written (sha256 in rsb.json), and loadable without executing code."""
    import torch

    files = read_json(tag_dir / "rsb.json").get("files")
    present = {f.name for f in tag_dir.iterdir() if f.name != "rsb.json"}
    if not files or set(files) != present:
        raise CheckpointMismatch(
            f"{tag_dir}: files {sorted(present)} are not the ones written ({sorted(files or [])})"
            "; the checkpoint is incomplete or was edited. Move it away to start fresh"
        )
    for name, digest in files.items():
        if sha256(tag_dir / name) != digest:
            raise CheckpointMismatch(
                f"{tag_dir / name}: content differs from what was written (sha256); the "
                "checkpoint is damaged or was tampered with. Move it away to start fresh"
            )
        try:
            with torch.serialization.safe_globals(_deepspeed_state_classes()):
                torch.load(tag_dir / name, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure means: do not hand it to a full unpickler
            raise CheckpointMismatch(
                f"{tag_dir / name}: does not load with weights_only=True ({type(e).__name__}: "
                f"{str(e)[:200]}); refusing to unpickle it"
            ) from None


def _deepspeed_state_classes() -> list:
    """The plain data classes DeepSpeed pickles into ZeRO optimizer states (its loss scaler, the ZeRO stage enum, a
    parameter fragment's address): allowed to be rebuilt by the weights-only unpickler, nothing that runs code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load(engine, ckpt_dir: Path, digest: str) -> dict | None:
    """Resume from `latest` if there is one; returns the client state, or None to start fresh."""
    tag = latest_tag(ckpt_dir)
    if dist.is_initialized():  # every rank must agree on what to load
        tags: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(tags, tag)
        if len(set(tags)) > 1:
            raise CheckpointMismatch(
                f"{ckpt_dir}: ranks see different latest checkpoints {tags}; the folder must "
                "be on a filesystem shared by all nodes"
            )
    if tag is None:
        return None
    meta = Path(ckpt_dir) / tag / "rsb.json"
    written_for = peek(ckpt_dir).get("digest")
    if written_for != digest:
        raise CheckpointMismatch(
            f"{ckpt_dir}/{tag}: written for recipe digest {written_for}, but this run's resolved recipe has digest "
            f"{digest}; it is another run's checkpoint. Move it away to start fresh"
        )
    verify(Path(ckpt_dir) / tag)
    _, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_module_strict=True, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if client is None or client.get("digest") != digest:
        raise CheckpointMismatch(
            f"{ckpt_dir}/{tag}: its client state does not match {meta}; the checkpoint is "
            "damaged or was edited. Move it away to start fresh"
        )
    return client
