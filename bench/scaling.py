"""How the train stage's cost grows with work: epochs, images, architectures (three sizes each).

    python -m bench.scaling [--recipe a1]

Runs `rsb.trainer.train_recipe` in-process (DeepSpeed, MLflow into a throwaway sqlite store, checkpoints) on
generated mini releases at the default scale, varying one thing at a time from resnet18 / 1 epoch / 80 images per
class. Prints the training-loop seconds, img/s and the stage's wall seconds (loop + init + checkpoints + final
validation).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from bench import scratch
from bench.train_vs_bare import ROOT, ours
from rsb import distributed


def prepared(work: Path, per_class: int) -> Path:
    from rsb.data.mini import write_release
    from rsb.data.prepare import build
    from rsb.data.spec import MiniSpec

    spec = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["mini"]
    out = work / f"prepared-{per_class}"
    if not out.exists():
        write_release(work / f"raw-{per_class}", MiniSpec(**{**spec, "train_per_class": per_class}))
        build(work / f"raw-{per_class}", out, "mini", verify_md5=False)
    return out


def measure(work: Path, arch: str, recipe: str, epochs: int, per_class: int) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["prepared"] = str(prepared(work, per_class))
    raw["scale"].update(min_epochs=epochs, epochs=1e-9)
    raw["models"] = [arch]
    f = work / f"params-{arch}-{epochs}-{per_class}.yaml"
    f.write_text(yaml.safe_dump(raw, sort_keys=False))
    m = ours(arch, recipe, f, work)
    images = json.loads((Path(raw["data"]["prepared"]) / "info.json").read_text())["images"]["train"]
    return {
        "arch": arch,
        "epochs": epochs,
        "images": images,
        "loop_s": m["train/time_s"],
        "img_per_s": m["train/img_per_s"],
        "stage_s": m["wall_s"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="a1")
    a = p.parse_args()
    work = scratch("rsb-scaling-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    distributed.init()
    distributed.set_threads(0)
    grid = (
        [("epochs", "resnet18", e, 80) for e in (1, 2, 4)]
        + [("images", "resnet18", 1, n) for n in (40, 80, 160)]
        + [("architecture", arch, 1, 80) for arch in ("resnet18", "resnet34", "resnet50")]
    )
    done: dict[tuple, dict] = {}
    print("| varied | arch | epochs | train images | loop s | img/s | stage s |\n|---|---|---|---|---|---|---|")
    for varied, arch, epochs, per_class in grid:
        key = (arch, epochs, per_class)
        if key not in done:
            done[key] = measure(work, arch, a.recipe, epochs, per_class)
        m = done[key]
        print(
            f"| {varied} | {arch} | {epochs} | {m['images']} | {m['loop_s']:.1f} | {m['img_per_s']:.1f} | "
            f"{m['stage_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
