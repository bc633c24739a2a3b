"""The train stage as dvc.yaml runs it, plus a record of the averaged gradient handed to the optimizer at each update.

    PYTHONPATH=tests python -m rsb.launch --devices N parity_worker --arch A --recipe R --params P   (GRADS_OUT=dir)

A global optimizer step pre-hook (torch's, not a patch of rsb) copies every gradient right before `step()`; each
rank writes grads-rank<r>.pt. Everything else is `stages.train.main`, unchanged.
"""
import os
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook


def record_grads(into: list):
    def hook(optimizer, args, kwargs):
        into.append([p.grad.detach().float().cpu().clone() for g in optimizer.param_groups for p in g["params"]])
    return register_optimizer_step_pre_hook(hook)


def main(argv: list[str]) -> None:
    from stages.train import main as train

    grads: list = []
    handle = record_grads(grads)
    try:
        train(argv)
    finally:
        handle.remove()
    out = Path(os.environ["GRADS_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(grads, out / f"grads-rank{os.environ.get('RANK', 0)}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
