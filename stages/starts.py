"""transfer-start@<name> / transfer-scratch: one start of the transfer study, checked against transfer.arch.

    python -m stages.starts --name a1        transfer.weights.a1 -> studies/transfer/starts/a1.safetensors (+ .json)
    python -m stages.starts --name scratch   timm's initialization of transfer.arch (seed train.seed)

A start holds every tensor of the architecture but its classifier. A file that is missing, is not a weights file
(loaded `weights_only`: nothing in it runs), or lacks or misshapes a tensor fails here, in one line, before any
fine-tuning (rsb.transfer). The .json beside it records the source file, its sha256 and the start's sha256.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from rsb import errors, transfer
from rsb.io import refuse_overlap
from rsb.config import SCRATCH, ConfigError, check_timm, load_params

STARTS = Path("studies/transfer/starts")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Check and store one fine-tuning start of the transfer study.")
    p.add_argument("--name", required=True, help=f"'{SCRATCH}' or a name under transfer.weights")
    p.add_argument("--params", default="params.yaml")
    args = p.parse_args(argv)
    params = load_params(args.params)
    check_timm(params)
    tr, dst = params.transfer, STARTS / f"{args.name}.safetensors"
    if args.name in tr.weights:
        refuse_overlap({"the start": dst}, {f"transfer.weights.{args.name}": Path(tr.weights[args.name])})
    if args.name == SCRATCH:
        meta = transfer.scratch_start(tr.arch, params.train.seed, dst)
    elif args.name in tr.weights:
        meta = transfer.import_start(Path(tr.weights[args.name]), tr.arch, dst)
    else:
        raise ConfigError(f"transfer.weights has no {args.name!r} ({', '.join(tr.weights) or 'empty'}); add "
                          f"`{args.name}: <weights file>` there")
    print(f"start {args.name}: {meta['tensors']} tensors of {tr.arch} from {meta['source']} -> {dst}")
    return meta


if __name__ == "__main__":
    errors.run(main)
