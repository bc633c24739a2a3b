"""The train stage as dvc.yaml runs it, plus a record of the averaged gradient handed to the optimizer at each update.

    PYTHONPATH=tests python -m rsb.launch --devices N parity_worker --arch A --recipe R --params P   (GRADS_OUT=dir)

A global optimizer step pre-hook (torch's, not a patch of rsb) copies every gradient right before `step()`; each
rank writes grads-rank<r>.pt. Everything else is `stages.train.main`, unchanged. INIT_SCALE=s starts every torch
GradScaler at s (fp16's loss scaler; the reference gets the same: tests/timm_reference.with_init_scale).
CONV_DTYPES_OUT=file records the dtypes of every convolution's output during training (torch's global forward hook).
"""

import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook


def record_grads(into: list):
    def hook(optimizer, args, kwargs):
        into.append([p.grad.detach().float().cpu().clone() for g in optimizer.param_groups for p in g["params"]])

    return register_optimizer_step_pre_hook(hook)


def main(argv: list[str]) -> None:
    from stages.train import main as train

    if "INIT_SCALE" in os.environ:
        from timm_reference import with_init_scale

        with_init_scale(float(os.environ["INIT_SCALE"]))
    grads: list = []
    handle = record_grads(grads)
    dtypes: set = set()
    conv = register_module_forward_hook(
        lambda m, i, o: dtypes.add(str(o.dtype)) if isinstance(m, torch.nn.Conv2d) and m.training else None
    )
    try:
        train(argv)
    finally:
        handle.remove()
        conv.remove()
    if "CONV_DTYPES_OUT" in os.environ:
        Path(os.environ["CONV_DTYPES_OUT"]).write_text(json.dumps(sorted(dtypes)))
    out = Path(os.environ["GRADS_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(grads, out / f"grads-rank{os.environ.get('RANK', 0)}.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
