"""finetune@<start>-<dataset>: the transfer study's fine-tune of transfer.arch from one start on one downstream
dataset, with the one procedure `recipes.<transfer.recipe>`, on DeepSpeed with 1..N processes (paper figure 7).

    python -m rsb.launch --nodes 1 --devices 1 ... stages.finetune --start a1 --dataset patterns   (studies/dvc.yaml)
    python -m stages.finetune --start a1 --dataset patterns                                       (one process)

Reads studies/transfer/starts/<start>.safetensors (stages.starts) and <transfer.root>/<dataset>/{train,val}/<class>/
(ImageFolder layout). The model is built as timm's train.py builds it with `--pretrained --pretrained-path <start>
--num-classes <the dataset's>`, then trained by the same loop, checkpoints and MLflow logging as the grid
(stages.train.launch), with the scale `transfer.epochs` / `transfer.lr_factor` put on the recipe. Writes
studies/transfer/{models,metrics/train,plots/train,runs}/<arch>-<start>-to-<dataset>.*; its val/top1 (the whole
downstream val split after the last epoch) is the study's number. A killed fine-tune resumes from
checkpoints/<name>/<digest>/, where the digest also covers the start's sha256 and the dataset's files.

Results card (2 cores AMD EPYC Zen 4, bf16 autocast, 2026-11-29, mini default: resnet50, 10 epochs of recipes.ft on
480 images at 32 px, batch 64): 37-46 s of training at 101-124 img/s in a 42-50 s stage; downstream val top-1 from
A1/A2/A3 starts 26.7-32.9%, from scratch 10.4-11.3% (chance 8.3%). BENCHMARKS.md, "The transfer study".
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from rsb import errors
from rsb.config import ConfigError, load_params, resolve
from rsb.data import folder
from rsb.io import read_json, refuse_overlap
from rsb.outputs import TRANSFER, Outputs
from stages.starts import STARTS
from stages.train import launch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Fine-tune transfer.arch from one start on one downstream dataset.")
    p.add_argument("--start", required=True, help="a name in transfer.starts")
    p.add_argument("--dataset", required=True, help="a folder under transfer.root")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    params = load_params(args.params)
    tr = params.transfer
    start = STARTS / f"{args.start}.safetensors"
    if not start.is_file() or not start.with_suffix(".json").is_file():
        raise ConfigError(f"{start}: no such start; run `dvc repro studies/dvc.yaml:finetune@{args.start}-"
                          f"{args.dataset}` (it builds the start first) or `python -m stages.starts --name {args.start}`")
    meta = read_json(start.with_suffix(".json"))
    if meta["arch"] != tr.arch:
        raise ConfigError(f"{start}: a start of {meta['arch']}, but transfer.arch is {tr.arch}; rebuild the start")
    data = Path(tr.root) / args.dataset
    info = folder.check(data)  # before the process group, the model or the checkpoint: one clear line
    data_digest = folder.digest(data)
    out = Outputs.finetune(tr.arch, args.start, args.dataset)
    refuse_overlap(out.training_outputs(), {f"transfer.root/{args.dataset}": data, "start": start})
    world = int(os.environ.get("WORLD_SIZE", params.train.devices * params.train.nodes))
    r = resolve(params, tr.arch, tr.recipe, world_size=world, scale=tr.scale(params.scale))
    tags = {"rsb.kind": "finetune", "rsb.arch": tr.arch, "rsb.recipe": tr.recipe, "rsb.study": TRANSFER,
            "rsb.seed": str(r.train.seed), "rsb.start": args.start, "rsb.start_source": meta["source"],
            "rsb.start_sha256": meta["sha256"], "rsb.dataset": args.dataset, "rsb.data_digest": data_digest[:16]}
    datasets = [{"name": f"{args.dataset} train", "source": str(data), "digest": data_digest[:16],
                 "profile": {"images": info["images"]["train"], "classes": len(info["classes"])}}]
    return launch(params, r, out, out.stage, tags, Path(params.data.prepared), datasets, folder=data, start=start,
                  identity=f"|start {meta['sha256']}|data {data_digest}")


if __name__ == "__main__":
    errors.run(main, errors.rank())
