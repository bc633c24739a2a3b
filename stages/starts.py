"""transfer-start@<name> / transfer-scratch: one start of the transfer study, checked against transfer.arch.

    python -m stages.starts --name a1        transfer.weights.a1 -> studies/transfer/starts/a1.safetensors (+ .json)
    python -m stages.starts --name scratch   timm's initialization of transfer.arch (seed train.seed)

A start holds every tensor of the architecture but its classifier. A file that is missing, is not a weights file
(loaded `weights_only`: nothing in it runs), or lacks or misshapes a tensor fails here, in one line, before any
fine-tuning (rsb.transfer). The .json beside it records the source file, its sha256 and the start's sha256.
"""

from __future__ import annotations

import argparse

from rsb import errors, transfer
from rsb.config import SCRATCH, load_params
from rsb.outputs import STARTS


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Check and store one fine-tuning start of the transfer study.")
    p.add_argument("--name", required=True, help=f"'{SCRATCH}' or a name under transfer.weights")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    meta = transfer.make_start(load_params(args.params), args.name)
    print(
        f"start {args.name}: {meta['tensors']} tensors of {meta['arch']} from {meta['source']} -> "
        f"{STARTS / args.name}.safetensors"
    )
    return meta


if __name__ == "__main__":
    errors.run(main)
