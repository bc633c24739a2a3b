"""The pipeline's own commands, as dvc.yaml runs them, on the machine the GPU check runs on: mini -> prepare ->
train (through `rsb.launch`, the real launcher) -> evaluate, each a fresh process that inherits PYTHONPATH.

    python -m bench.gpu_stage --out DIR [--devices N]    # N = 1 on one GPU; the CPU rehearsal uses 2, so
                                                         # DeepSpeed's launcher (as a module) starts the workers

At tiny sizes (test_resnet, 32 px, 2 epochs, timm's prefetcher on as on a GPU): it shows that every import,
subprocess and launcher path works where the wheels were carried, not how fast anything is (bench/gpu.py measures).
Writes DIR/stage.json after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench import scratch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "models": ["test_resnet"],
    "run": ["a1"],
    "scale": {"epochs": 0.005, "min_epochs": 2, "img_size": 32, "batch_size": 16},
    "train": {"micro_batch": 8, "workers": 1, "threads": 1, "master_port": 0, "prefetcher": True},
    "data": {"mini": {"classes": 4, "train_per_class": 16, "val_per_class": 4, "v2_per_class": 2, "image_size": 48}},
    "evaluate": {"workers": 0},
}


def merge(base: dict, over: dict) -> dict:
    return {**base, **{k: merge(base.get(k, {}), v) if isinstance(v, dict) else v for k, v in over.items()}}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> tuple[int, str]:
    """One step in its own process group, stdout and stderr together. On a timeout, or when this script is stopped
    (bench/gpu.sh's `timeout` sends SIGTERM), the whole group is killed: a launcher's ranks must not outlive it
    holding cores or a GPU. Returns (exit status, 124 on a timeout; the output)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )

    def kill(*_):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda *_: (kill(), sys.exit(143)))
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        kill()
        return 124, proc.communicate()[0]
    finally:
        kill()  # whatever of the group outlived its leader
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--devices", type=int, default=1)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = scratch("rsb-gpu-stage-")
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    params["data"].update({"raw": str(work / "raw"), "prepared": str(work / "prepared")})
    params["train"]["devices"] = args.devices
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "RSB_TRACKING": "off",
        "PYTHONPATH": ":".join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    steps = [
        ["stages.mini"],
        ["stages.prepare"],
        ["rsb.launch", "--devices", str(args.devices), "stages.train", "--arch", "test_resnet", "--recipe", "a1"],
        ["stages.evaluate", "--arch", "test_resnet", "--recipe", "a1"],
    ]
    result = {"devices": args.devices, "steps": []}
    for cmd in steps:
        t0 = time.perf_counter()
        rc, log = run([sys.executable, "-m", *cmd, "--params", str(work / "params.yaml")], work, env, 600)
        result["steps"].append({"cmd": " ".join(cmd), "rc": rc, "s": round(time.perf_counter() - t0, 1)})
        print(
            f"{' '.join(cmd)}: rc {rc}{' (timed out)' if rc == 124 else ''}, {result['steps'][-1]['s']} s", flush=True
        )
        (args.out / "stage.json").write_text(json.dumps(result, indent=2) + "\n")  # each step kept if a later is cut
        if rc:
            print(log[-8000:], file=sys.stderr)
            break
    else:
        result["eval"] = json.loads((work / "metrics/eval/test_resnet-a1.json").read_text())
        print(f"val top-1 {result['eval']['val/top1']:.2f} after {args.devices} process(es)")
    (args.out / "stage.json").write_text(json.dumps(result, indent=2) + "\n")
    if any(s["rc"] for s in result["steps"]):
        sys.exit(1)
    return result


if __name__ == "__main__":
    main()
