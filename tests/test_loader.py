"""rsb.loader on timm's prefetcher path: batch for batch what train.py's `create_loader(use_prefetcher=True)`
yields (uint8 transform, FastCollateMixup as collate_fn, normalization and random erasing by timm's PrefetchLoader),
per virtual rank, through timm's samplers, over an epoch boundary; the reference is tests/timm_reference.py."""

from __future__ import annotations

import pytest
import timm
import timm_reference as ref
import torch
import yaml
from conftest import write_params
from torchvision.datasets import ImageFolder

from rsb import loader as loaders
from rsb.config import load_params, resolve
from rsb.data.datasets import Split
from rsb.models import create_model

VIRTUAL = 4  # one process accumulating 4 micro-batches of 4: the slots of 4 of train.py's processes


def batches(tmp_path, prepared, extracted, recipe: str, cfg: dict, epochs=(0, 1)):
    """(ours, train.py's) micro-batches per epoch: ours in the order the stage's loader yields them (update u,
    slot v), train.py's as [v][u] for each of its VIRTUAL processes."""
    path = write_params(
        tmp_path / "params.yaml", prepared, {"train.precision": "fp32", "train.micro_batch": 4, "train.seed": 3, **cfg}
    )
    r = resolve(load_params(path), "test_resnet", recipe, world_size=1)
    assert r.train.prefetcher is (cfg.get("train.prefetcher") is True) and r.grad_accum == VIRTUAL
    args = ref.args_for(yaml.safe_load(path.read_text()), recipe, "test_resnet", 20, 4, VIRTUAL, 1, overrides=cfg)
    cpu = torch.device("cpu")
    model = create_model(r, 20)
    ours_ds = Split(prepared, "train", loaders.train_transform(r, model))
    theirs_ds = ImageFolder(extracted / "train")
    prefetcher = ref.create_prefetch_loader(args, theirs_ds, ref.create_model(args), cpu)
    original = prefetcher.loader
    out = []
    for epoch in epochs:
        ours = list(loaders.train_loader(ours_ds, r, 0, epoch, cpu, loaders.normalization(model)))
        theirs = []
        for v in range(VIRTUAL):
            sampler = ref.create_sampler(theirs_ds, args, VIRTUAL, v)
            sampler.set_epoch(epoch)
            stream = ref.stream_seed(args.seed, epoch, v)
            theirs.append(list(ref.prefetch_epoch(prefetcher, original, sampler, 4, stream)))
        out.append((ours, theirs))
    return out


# A1-A3 erase nothing (the paper's table); T2 erases with 0.25 and mixes as A1 does
@pytest.mark.parametrize("recipe, cfg", [("t2", {}), ("a1", {"recipes.a1.reprob": 0.25})])
def test_prefetcher_batches_are_create_loaders(tmp_path, prepared, extracted, world, recipe, cfg):
    """Every micro-batch of two epochs, bit for bit: images (uint8 Mixup/CutMix, normalized, erased) and soft
    targets; the batches are really mixed and erased, and epochs differ."""
    cfg = {"train.prefetcher": True, **cfg}
    epochs = batches(tmp_path, prepared, extracted, recipe, cfg)
    for e, (ours, theirs) in enumerate(epochs):
        assert len(ours) == sum(len(t) for t in theirs) > 0
        for j, (x, y) in enumerate(ours):
            tx, ty = theirs[j % VIRTUAL][j // VIRTUAL]
            assert x.dtype == tx.dtype == torch.float32 and y.shape == ty.shape == (4, 20)
            assert torch.equal(y, ty), f"epoch {e}, micro-batch {j}: targets differ"
            assert torch.equal(x, tx), f"epoch {e}, micro-batch {j}: images off by {(x - tx).abs().max():.3g}"
    ours = torch.cat([x for x, _ in epochs[0][0]])
    targets = torch.cat([y for _, y in epochs[0][0]])
    assert (targets.max(1).values < 0.95).any(), "Mixup/CutMix mixed the targets"
    assert abs(float(ours.mean())) < 1.0 and 0.3 < float(ours.std()) < 3, "normalized with the model's mean/std"
    assert loaders.normalization(timm.create_model("test_resnet")) == {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    pixels = ours * 127.5 + 127.5  # normalization undone
    erased = (pixels < -1) | (pixels > 256)  # N(0, 1) in normalized units: 1 in 3 beyond the uint8 range
    assert erased.float().mean() > 0.005, "random erasing drew pixels"
    assert not torch.equal(epochs[0][0][0][0], epochs[1][0][0][0]), "epochs draw anew"


def test_without_the_prefetcher_the_loader_yields_normalized_float_batches(tmp_path, prepared, extracted, world):
    """train.py's --no-prefetcher path stays the stage's on the CPU (`auto`): float images, class indices, the step
    mixes (tests/test_train.py holds that path against train.py)."""
    path = write_params(tmp_path / "params.yaml", prepared, {"train.micro_batch": 4})
    r = resolve(load_params(path), "test_resnet", "a1", world_size=1)
    assert r.train.prefetcher is False and loaders.mixup(r, 20) is not None
    model = create_model(r, 20)
    x, y = next(
        iter(
            loaders.train_loader(
                Split(prepared, "train", loaders.train_transform(r, model)), r, 0, 0, torch.device("cpu")
            )
        )
    )
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and y.shape == (4,)
    on = resolve(
        load_params(write_params(tmp_path / "on.yaml", prepared, {"train.prefetcher": True})),
        "test_resnet",
        "a1",
        world_size=1,
    )
    assert loaders.mixup(on, 20) is None, "with the prefetcher the collate mixes, the step does not"
    assert on.digest() != r.digest(), "a checkpoint does not resume across the two data paths"


def test_erasing_leaves_the_training_steps_streams_alone():
    """The seeded erasing restores the process's generators: drop path draws what it would without it."""
    torch.manual_seed(1)
    expected = torch.rand(3)
    erase = loaders.SeededCalls(lambda x: x + torch.rand_like(x), [7, 8], torch.device("cpu"))
    torch.manual_seed(1)
    first = erase(torch.zeros(2))
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(
        loaders.SeededCalls(lambda x: x + torch.rand_like(x), [7], torch.device("cpu"))(torch.zeros(2)), first
    ), "the i-th call draws from its own seed"
