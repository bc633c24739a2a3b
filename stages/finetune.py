"""finetune@<start>-<dataset>: the transfer study's fine-tune of transfer.arch from one start on one downstream
dataset, with the one procedure `recipes.<transfer.recipe>`, on DeepSpeed with 1..N processes (paper figure 7).

    python -m rsb.launch --nodes 1 --devices 1 ... stages.finetune --start a1 --dataset patterns   (studies/dvc.yaml)
    python -m stages.finetune --start a1 --dataset patterns                                       (one process)

Reads studies/transfer/starts/<start>.safetensors (stages.starts) and <transfer.root>/<dataset>/{train,val}/<class>/
(ImageFolder layout). The model is built as timm's train.py builds it with `--pretrained --pretrained-path <start>
--num-classes <the dataset's>`, then trained by the same loop, checkpoints and MLflow logging as the grid
(rsb.trainer.train_job; the job is rsb.finetune.finetune), with the scale `transfer.epochs` / `transfer.lr_factor`
put on the recipe. Writes studies/transfer/{models,metrics/train,plots/train,runs}/<arch>-<start>-to-<dataset>.*;
its val/top1 (the whole downstream val split after the last epoch) is the study's number. A killed fine-tune resumes
from checkpoints/<name>/<digest>/, where the digest also covers the start's sha256 and the dataset's files.

Measured cost: BENCHMARKS.md (section 8 and the stage's own section).
"""

from __future__ import annotations

import argparse

from rsb import errors, finetune
from rsb.config import load_params


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Fine-tune transfer.arch from one start on one downstream dataset.")
    p.add_argument("--start", required=True, help="a name in transfer.starts")
    p.add_argument("--dataset", required=True, help="a folder under transfer.root")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return finetune.finetune(load_params(args.params), args.start, args.dataset)


if __name__ == "__main__":
    errors.run(main, errors.rank())
