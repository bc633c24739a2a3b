"""The transfer study's fine-tune (paper figure 7) as a training job: transfer.arch from a checked start
(rsb.transfer) on a downstream ImageFolder dataset, with the one procedure `recipes.<transfer.recipe>` at the transfer
scale, through the grid's own job (rsb.trainer.train_job: the same loop, DeepSpeed engine, checkpoints, MLflow)."""

from __future__ import annotations

from pathlib import Path

from rsb.config import ConfigError, Params, resolve
from rsb.data import folder
from rsb.io import read_json, refuse_overlap
from rsb.outputs import STARTS, TRANSFER, Outputs
from rsb.trainer import Job, train_job, world_size


def finetune(params: Params, start_name: str, dataset: str) -> dict:
    """finetune@<start>-<dataset>: transfer.arch from the checked start `start_name` on the ImageFolder dataset
    <transfer.root>/<dataset>, with recipes.<transfer.recipe> at the transfer scale, through rsb.trainer's
    `train_job` (the grid's loop, checkpoints and MLflow logging). The resume digest also covers the start's sha256 and
    the dataset's files."""
    tr = params.transfer
    start = STARTS / f"{start_name}.safetensors"
    if not start.is_file() or not start.with_suffix(".json").is_file():
        raise ConfigError(
            f"{start}: no such start; run `dvc repro studies/dvc.yaml:finetune@{start_name}-"
            f"{dataset}` (it builds the start first) or `python -m stages.starts --name {start_name}`"
        )
    meta = read_json(start.with_suffix(".json"))
    if meta["arch"] != tr.arch:
        raise ConfigError(f"{start}: a start of {meta['arch']}, but transfer.arch is {tr.arch}; rebuild the start")
    data = Path(tr.root) / dataset
    info = folder.check(data)  # before the process group, the model or the checkpoint: one clear line
    data_digest = folder.digest(data)
    out = Outputs.finetune(tr.arch, start_name, dataset)
    refuse_overlap(out.training_outputs(), {f"transfer.root/{dataset}": data, "start": start})
    r = resolve(params, tr.arch, tr.recipe, world_size=world_size(params), scale=tr.scale(params.scale))
    tags = {
        "rsb.kind": "finetune",
        "rsb.arch": tr.arch,
        "rsb.recipe": tr.recipe,
        "rsb.study": TRANSFER,
        "rsb.seed": str(r.train.seed),
        "rsb.start": start_name,
        "rsb.start_source": meta["source"],
        "rsb.start_sha256": meta["sha256"],
        "rsb.dataset": dataset,
        "rsb.data_digest": data_digest[:16],
    }
    datasets = (
        {
            "name": f"{dataset} train",
            "source": str(data),
            "digest": data_digest[:16],
            "profile": {"images": info["images"]["train"], "classes": len(info["classes"])},
        },
    )
    job = Job(
        stage=out.stage,
        out=out,
        tags=tags,
        datasets=datasets,
        prepared=Path(params.data.prepared),
        experiment=params.experiment,
        eval_batch=params.evaluate.batch_size,
        folder=data,
        start=start,
        identity=f"|start {meta['sha256']}|data {data_digest}",
        module=__name__,
    )
    return train_job(job, r)
