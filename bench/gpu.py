"""The measurements of bench/gpu.sh, written to one folder (gpu.json and gpu.md rewritten after every phase, a line
each on stdout).

    python -m bench.gpu --out DIR             # on a CUDA machine: resnet50, 224 px, bf16, channels_last
    python -m bench.gpu --out DIR --dry-run   # anywhere: test_resnet, 32 px, fp32, CPU (CI runs this)

Every training rate is a steady-state window: the first WARMUP updates of an epoch (the loader's workers starting,
cuDNN choosing kernels, the first batches) are not timed, the next WINDOW updates are, by one clock for all three
(a timestamp at each optimizer step, torch's global step pre-hook, after synchronizing the device). Phases, cheapest
first, each written before the next starts; one cut by a timeout or a SIGTERM is named `cut` in gpu.json and gpu.md:

1. data: an ImageFolder of full-size JPEGs (~500 px, as ImageNet's), generated on every core (a process per class
   group) and hard-linked REPEATS times so an epoch holds more than WARMUP + WINDOW updates; indexed by prepare's
   folder source;
2. train: the train stage's job (`rsb.trainer.train_recipe`: DeepSpeed, MLflow into a throwaway store, checkpoints)
   and a bare timm loop on the same batches (bench.train_vs_bare), at the largest micro-batch of the candidates whose
   forward + backward fits, timm's prefetcher on (as `auto` decides on a GPU; the dry run takes that path on the CPU
   too), the loader's workers all but two cores;
3. ceiling: the same model, LAMB, BCE and precision on one synthetic batch already on the device (no loader, no
   Mixup): what the card can do with this model; MFU of stage, bare and ceiling against the card's dense bf16 peak
   (6 x forward MACs per image);
4. loader: one worker alone, A1's transforms on those JPEGs (its first batch, the worker's start, not timed): img/s
   per worker, and the workers the bare loop's rate needs;
5. benchmark: the benchmark stage's batch-128 throughput and peak memory (`rsb.profiling.throughput`) against a plain
   `torch.inference_mode` loop on the same model and input;
6. compiled: the train stage with `train.compile: true` over two epochs, its window in the second (after
   compilation; not in the dry run: inductor's CPU compile alone takes minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.optim.optimizer import register_optimizer_step_pre_hook

from bench import scratch
from bench.train_vs_bare import ROOT, bare_epochs, ours
from rsb import distributed, hardware, profiling
from rsb import loader as loaders
from rsb.config import load_params, override, resolve
from rsb.data.datasets import Split

# dense bf16 peak FLOP/s from the vendor's data sheets (SXM parts; the PCIe/NVL H100 is lower: the MFU then reads low)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
WARMUP, WINDOW = 10, 30  # updates of an epoch: not timed, then timed
FULL = {
    "arch": "resnet50",
    "img": 224,
    "precision": "bf16",
    "candidates": [256, 192, 128],
    "data": {"classes": 20, "unique_per_class": 100, "repeats": 6, "image_size": 500},  # 12,000 images
    "bench_batch": 128,
    "repeats": 10,
}
DRY = {
    "arch": "test_resnet",
    "img": 32,
    "precision": "fp32",
    "candidates": [8],
    "data": {"classes": 4, "unique_per_class": 16, "repeats": 8, "image_size": 64},  # 512 images: 64 updates of 8
    "bench_batch": 8,
    "repeats": 2,
}


class Clock:
    """A timestamp at every optimizer step of this process (before it runs, the device synchronized): the interval
    between step k and step k + n is n whole updates, whichever loop drives them."""

    def __init__(self, device: torch.device):
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        self.times: list[float] = []

    def __enter__(self) -> Clock:
        self.times = []
        self.handle = register_optimizer_step_pre_hook(self._tick)
        return self

    def _tick(self, *_) -> None:  # a pre-hook that returns something would replace the step's arguments
        self.sync()
        self.times.append(time.perf_counter())

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def rate(self, images_per_update: int, first: int = WARMUP) -> float:
        """img/s over updates [first, first + WINDOW)."""
        if len(self.times) < first + WINDOW + 1:
            raise RuntimeError(f"{len(self.times)} updates ran; the window needs {first + WINDOW + 1}")
        return WINDOW * images_per_update / (self.times[first + WINDOW] - self.times[first])


class Report:
    """gpu.json and gpu.md, rewritten as each phase starts and ends; a phase that fails is recorded and the next one
    runs; a SIGTERM (bench/gpu.sh's timeout) marks the running phase `cut` before the process ends."""

    def __init__(self, out: Path, head: dict):
        self.out, self.result, self.running, self.t0 = out, {**head, "phases": {}}, None, time.perf_counter()
        signal.signal(signal.SIGTERM, self._cut)

    def write(self) -> None:
        (self.out / "gpu.json").write_text(json.dumps(self.result, indent=1))
        (self.out / "gpu.md").write_text(markdown(self.result))

    @contextmanager
    def phase(self, name: str):
        self.running, began = name, time.perf_counter()
        self.result["phases"][name] = "running"
        self.write()
        try:
            yield self.result
            status = f"done in {time.perf_counter() - began:.0f} s"
        except Exception as e:  # noqa: BLE001 - a measurement that failed is reported, the others still run
            status = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        self.result["phases"][name], self.running = status, None
        self.write()
        print(f"phase {name}: {status}", flush=True)

    def _cut(self, signum, frame) -> None:
        if self.running:
            self.result["phases"][self.running] = f"cut after {time.perf_counter() - self.t0:.0f} s of the script"
            self.write()
            print(f"phase {self.running}: cut", flush=True)
        raise SystemExit(124)


def _draw_class(task: tuple[int, int, int, int, Path]) -> int:
    """One class's unique JPEGs (a process each: the generator's drawing is single-threaded)."""
    from rsb.data.mini import TRAIN_STYLE, jpeg_bytes, render

    label, unique, size, seed, folder = task
    rng = np.random.default_rng([seed, label])
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(unique):
        (folder / f"{folder.name}_{n}.JPEG").write_bytes(jpeg_bytes(render(rng, [label], TRAIN_STYLE, size)))
    return unique


def jpeg_folder(work: Path, classes: int, unique_per_class: int, repeats: int, image_size: int) -> Path:
    """An extracted-ImageNet folder (`data.source: folder`): train/<wnid>/ with full-size JPEGs drawn on every core
    and hard-linked `repeats` times; val, V2, the devkit and real.json from a small mini release. Returns the
    prepared index over it."""
    from rsb.data.index import ARCHIVES
    from rsb.data.mini import write_release
    from rsb.data.prepare import build
    from rsb.data.spec import WNIDS, MiniSpec

    small, raw = work / "small", work / "raw"
    write_release(small, MiniSpec(classes=classes, train_per_class=1, val_per_class=1, v2_per_class=1, image_size=64))
    wnids = sorted(w for w, _ in WNIDS[:classes])
    tasks = [(i, unique_per_class, image_size, 0, raw / "train" / w) for i, w in enumerate(wnids)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_draw_class, tasks))
    for w in wnids:
        for f in sorted((raw / "train" / w).glob("*.JPEG")):
            for k in range(1, repeats):
                os.link(f, f.with_name(f"{f.stem}_r{k}.JPEG"))
    with tarfile.open(small / ARCHIVES["val"]) as val:
        (raw / "val").mkdir()
        for m in val.getmembers():
            (raw / "val" / m.name).write_bytes(val.extractfile(m).read())  # type: ignore[union-attr]
    with tarfile.open(small / ARCHIVES["v2"]) as v2:
        for m in (m for m in v2.getmembers() if m.isfile()):
            target = raw / "v2" / Path(m.name).parent.name
            target.mkdir(parents=True, exist_ok=True)
            (target / Path(m.name).name).write_bytes(v2.extractfile(m).read())  # type: ignore[union-attr]
    for key in ("devkit", "real"):
        (raw / ARCHIVES[key]).write_bytes((small / ARCHIVES[key]).read_bytes())
    build(raw, work / "prepared", "folder", verify_md5=False)
    return work / "prepared"


def largest_micro_batch(arch: str, img: int, candidates: list[int], device: torch.device, dtype) -> int:
    """The largest candidate whose training step (forward + backward at the stage's precision) fits in memory."""
    for batch in candidates:
        try:
            model = timm_model(arch).to(device).to(memory_format=torch.channels_last)
            x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x).float().sum().backward()
            return batch
        except torch.OutOfMemoryError:
            pass
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    raise RuntimeError(f"none of {candidates} fits")


def timm_model(arch: str, num_classes: int = 1000) -> torch.nn.Module:
    import timm

    return timm.create_model(arch, num_classes=num_classes)


def ceiling(r, classes: int, device: torch.device) -> float:
    """The recipe's model, LAMB and BCE at its precision on one batch already on the device: no loader, no Mixup."""
    from rsb.training import create_loss, create_optimizer

    model = timm_model(r.arch, classes).to(device).to(memory_format=torch.channels_last)
    optimizer, loss_fn, dtype = create_optimizer(model, r), create_loss(r), hardware.AUTOCAST[r.train.precision]
    x = torch.randn(r.micro_batch, 3, r.img_size, r.img_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.softmax(torch.randn(r.micro_batch, classes, device=device), 1)  # Mixup's soft targets
    with Clock(device) as clock:
        for _ in range(WARMUP + WINDOW + 1):
            with hardware.autocast(device, dtype):
                loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return clock.rate(r.micro_batch)


def loader_per_worker(r, prepared: Path, model) -> float:
    """img/s of one loader worker over the epoch's micro-batches (decode, A1 transforms, collate); its first batch
    (the worker starting) is not timed."""
    ds = Split(prepared, "train", loaders.train_transform(r, model))
    one = r.__class__(**{**r.__dict__, "train": r.train.__class__(**{**r.train.__dict__, "workers": 1})})
    seen, t0 = 0, 0.0
    loader = loaders.train_loader(ds, one, 0, 0, torch.device("cpu"), loaders.normalization(model))
    for i, (x, _) in enumerate(getattr(loader, "loader", loader)):  # the workers' side of a PrefetchLoader
        if i == 0:
            t0 = time.perf_counter()
            continue
        seen += x.shape[0]
    return seen / (time.perf_counter() - t0)


def plain_inference(model, batch: int, img: int, device, dtype, repeats: int) -> float:
    model = model.eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, img, img, device=device).contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(repeats + 2):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def markdown(r: dict) -> str:
    t, b, ld = r.get("train", {}), r.get("benchmark", {}), r.get("loader", {})

    def num(v, fmt="{:.0f}"):
        return fmt.format(v) if isinstance(v, (int, float)) else (v or "not measured")

    rows = [
        (f"train stage img/s (updates {WARMUP}-{WARMUP + WINDOW - 1} of an epoch)", num(t.get("ours_img_s"))),
        ("bare timm loop img/s (same window)", num(t.get("bare_img_s"))),
        ("synthetic ceiling img/s (same window)", num(t.get("ceiling_img_s"))),
        ("stage / bare / ceiling MFU (bf16 peak)", " / ".join(num(t.get(k), "{:.1%}") for k in MFU_KEYS)),
        ("stage / bare", num(t.get("ratio"), "{:.3f}")),
        ("train stage, compiled, img/s (second epoch's window)", num(t.get("compiled_img_s"))),
        ("MFU compiled", num(t.get("compiled_mfu"), "{:.1%}")),
        ("loader img/s per worker (A1, ~500 px JPEG)", num(ld.get("img_s_per_worker"))),
        ("workers one GPU needs (bare loop's rate)", num(ld.get("workers_needed"), "{:.1f}")),
        (f"benchmark stage img/s (batch {b.get('batch', '?')})", num(b.get("stage_img_s"))),
        ("plain inference_mode img/s", num(b.get("plain_img_s"))),
        (f"peak memory MB ({b.get('peak_mem_kind', '?')})", num(b.get("peak_mem_mb"))),
    ]
    head = f"{r['device']}, {r['date']}, torch {r['torch']}: {r['arch']} {r['img']} px {r['precision']}" + (
        " (DRY RUN: sizes that check the script, not measurements)" if r["dry_run"] else ""
    )
    phases = "".join(f"| phase {k} | {v} |\n" for k, v in r["phases"].items())
    return head + "\n\n| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows) + phases


MFU_KEYS = ("mfu", "bare_mfu", "ceiling_mfu")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    a = p.parse_args(argv)
    cfg = DRY if a.dry_run else FULL
    if a.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; use --dry-run on a CPU machine")
    a.out.mkdir(parents=True, exist_ok=True)
    work = scratch("rsb-gpu-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    device = hardware.device_for(0)
    report = Report(
        a.out,
        {
            "device": hardware.device_name(device),
            "dry_run": a.dry_run,
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "arch": cfg["arch"],
            "img": cfg["img"],
            "precision": cfg["precision"],
            "warmup_updates": WARMUP,
            "window_updates": WINDOW,
        },
    )
    res = report.result
    with report.phase("data"):
        res["prepared_images"] = len(Split(jpeg_folder(work, **cfg["data"]), "train"))
    prepared = work / "prepared"
    dtype = hardware.AUTOCAST[cfg["precision"]]
    micro = largest_micro_batch(cfg["arch"], cfg["img"], cfg["candidates"], device, dtype)
    workers = 1 if a.dry_run else max(1, min(14, (os.cpu_count() or 2) - 2))
    res.update(micro_batch=micro, loader_workers=workers, prefetcher=True)
    raw = override(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        {
            "models": [cfg["arch"]],
            "run": ["a1"],
            "data.prepared": str(prepared),
            "data.source": "folder",
            "scale.epochs": 1e-9,
            "scale.min_epochs": 1,
            "scale.img_size": cfg["img"],
            "scale.batch_size": micro,
            "scale.lr_rule": "none",
            "train.micro_batch": micro,
            "train.precision": cfg["precision"],
            "train.workers": workers,
            "train.eval_every": 0,
            "train.threads": 0,
            "train.prefetcher": True,
        },
    )
    params_file = work / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    distributed.init()
    r = resolve(load_params(params_file), cfg["arch"], "a1", world_size=1)
    # A1's RepeatAugSampler selects a multiple of 256 of the images: the epoch's updates, as the stage counts them
    train_set = Split(prepared, "train")
    updates_per_epoch = loaders.MicroBatchSampler(train_set, micro, 1, 1, 0, r.recipe.aug_repeats).updates
    res["updates_per_epoch"] = updates_per_epoch
    if updates_per_epoch < WARMUP + WINDOW + 1:
        raise SystemExit(f"error: {updates_per_epoch} updates per epoch; the window needs {WARMUP + WINDOW + 1}")
    gmacs = profiling.count(timm_model(cfg["arch"]), cfg["img"])["gmacs"]
    peak = next((v for k, v in PEAK_BF16.items() if k in hardware.device_name(device)), None)
    res.update(gmacs=gmacs, peak_bf16_flops=peak)

    def mfu(rate):  # training: forward + backward ~ 3 x forward; a MAC is 2 FLOPs
        return rate * 6 * gmacs * 1e9 / peak if peak and isinstance(rate, float) else None

    train = res.setdefault("train", {})
    with report.phase("train"):
        with Clock(device) as clock:
            bare_epochs(r, prepared, device)
        train.update(bare_img_s=clock.rate(micro), bare_mfu=mfu(clock.rate(micro)))
        report.write()
        with Clock(device) as clock:
            ours(cfg["arch"], "a1", params_file, work)
        train.update(ours_img_s=clock.rate(micro), mfu=mfu(clock.rate(micro)))
        train["ratio"] = train["ours_img_s"] / train["bare_img_s"]
    with report.phase("ceiling"):
        rate = ceiling(r, len(json.loads((prepared / "classes.json").read_text())), device)
        train.update(ceiling_img_s=rate, ceiling_mfu=mfu(rate))
    with report.phase("loader"):
        per_worker = loader_per_worker(r, prepared, timm_model(cfg["arch"]))
        needed = train["bare_img_s"] / per_worker if "bare_img_s" in train else None
        res["loader"] = {"img_s_per_worker": per_worker, "workers_needed": needed}
    with report.phase("benchmark"):
        model = timm_model(cfg["arch"])
        stage = profiling.throughput(model, cfg["bench_batch"], cfg["img"], device, dtype, True, 2, cfg["repeats"])
        plain = plain_inference(timm_model(cfg["arch"]), cfg["bench_batch"], cfg["img"], device, dtype, cfg["repeats"])
        res["benchmark"] = {
            "stage_img_s": stage["img_per_s"],
            "plain_img_s": plain,
            "ratio": stage["img_per_s"] / plain,
            "peak_mem_mb": stage["peak_mem_mb"],
            "peak_mem_kind": stage["peak_mem_kind"],
            "batch": cfg["bench_batch"],
        }
    if a.dry_run:
        train["compiled_img_s"] = "not in the dry run"
    else:
        with report.phase("compiled"):
            compiled = override(raw, {"train.compile": True, "scale.min_epochs": 2})
            (work / "compiled.yaml").write_text(yaml.safe_dump(compiled, sort_keys=False))
            with Clock(device) as clock:
                ours(cfg["arch"], "a1", work / "compiled.yaml", work)
            rate = clock.rate(micro, first=updates_per_epoch + WARMUP)  # the second epoch's window
            train.update(compiled_img_s=rate, compiled_mfu=mfu(rate))
    report.write()
    print(markdown(res), flush=True)
    return res


if __name__ == "__main__":
    main()
