"""evaluate: ReaL scoring rules, V2's folder-index labels through evaluation, the paper's eval transform."""
from __future__ import annotations

import io
import json

import pytest
import timm
import torch
from torchvision import transforms as T

from rsb.data import loader as loaders
from rsb.data.datasets import Split
from rsb.errors import InputError
from rsb.io import save_weights
from rsb.evaluation import evaluate_model


@pytest.mark.parametrize("size, crop_pct, resize", [(224, 0.95, 235), (64, 0.95, 67), (160, 0.875, 182)])
def test_eval_transform_is_the_papers(size, crop_pct, resize):
    tf = loaders.eval_transform(size, crop_pct, timm.create_model("resnet18", num_classes=20))
    r, c = tf.transforms[0], tf.transforms[1]
    assert isinstance(r, T.Resize) and r.size == resize and r.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(c, T.CenterCrop) and tuple(c.size) == (size, size)
    norm = tf.transforms[-1]
    assert norm.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert norm.std.tolist() == pytest.approx([0.229, 0.224, 0.225])
    from PIL import Image
    assert tf(Image.new("RGB", (300, 250))).shape == (3, size, size)


class FolderOracle(torch.nn.Module):
    """A 'model' that predicts the class an image was stored under: it reads the label smuggled in the pixels."""
    num_classes = 20

    def forward(self, x):
        label = x[:, 0, 0, 0].round().long()
        return torch.nn.functional.one_hot(label, self.num_classes).float() * 10


def test_v2_folder_index_maps_through_evaluation(prepared, monkeypatch):
    """Evaluation scores V2 folder k as class k: an oracle of each sample's folder gets 100% on V2 and val."""
    from rsb.data import datasets

    def getitem(self, i):
        path, label = self.samples[i]
        truth = int(path.parent.name) if self.split == "v2" else \
            json.loads((self.root / "classes.json").read_text())[label]["index"]
        return torch.full((3, 8, 8), float(truth)), label

    monkeypatch.setattr(datasets.Split, "__getitem__", getitem)
    out = evaluate_model(FolderOracle(), prepared, 8, 0.95, 16, 0, "fp32")
    assert out["v2/top1"] == 100.0 and out["val/top1"] == 100.0
    assert out["v2/count"] == len(Split(prepared, "v2")) and out["val/count"] == len(Split(prepared, "val"))
    real = Split(prepared, "val").real_labels()
    assert out["real/count"] == sum(1 for r in real if r) < out["val/count"]
    assert out["real/top1"] < 100.0, "ReaL relabels some val images, so val labels are not all ReaL-correct"


def test_stage_writes_and_logs(tmp_path, prepared, monkeypatch):
    from conftest import write_params
    from stages.evaluate import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = write_params(tmp_path / "params.yaml", prepared)
    (tmp_path / "models").mkdir()
    save_weights(tmp_path / "models/test_resnet-a3.safetensors", timm.create_model("test_resnet", num_classes=20).state_dict())
    m = main(["--arch", "test_resnet", "--recipe", "a3", "--params", str(p)])
    saved = json.loads((tmp_path / "metrics/eval/test_resnet-a3.json").read_text())
    for key in ("val/top1", "val/top5", "real/top1", "real/top5", "v2/top1", "v2/top5", "val/count", "real/count",
                "v2/count", "transform"):
        assert key in saved
    assert saved["transform"]["crop"] == 32 and saved["transform"]["resize_shorter"] == 33
    assert m["val/top1"] == saved["val/top1"]


def test_missing_weights_name_the_stage(tmp_path, prepared, monkeypatch):
    from conftest import write_params
    from stages.evaluate import main

    monkeypatch.chdir(tmp_path)
    p = write_params(tmp_path / "params.yaml", prepared)
    with pytest.raises(InputError, match="run `dvc repro train@test_resnet-a1`"):
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])


def test_eval_transform_equals_timms_on_real_images(prepared):
    """On the mini release's own files, decoded as the datasets decode them (ImageNet's PNG-named JPEG and a CMYK
    JPEG included): tensor-equal to timm's create_transform(224, bicubic, crop_pct 0.95) = resize 235, crop 224."""
    from PIL import Image
    from timm.data import create_transform

    ours = loaders.eval_transform(224, 0.95, timm.create_model("resnet50", num_classes=20))
    theirs = create_transform(224, is_training=False, interpolation="bicubic", crop_pct=0.95)
    assert ours.transforms[0].size == 235
    train = Split(prepared, "train", ours)
    picks = [i for i, (f, _) in enumerate(train.samples) if f.stem.endswith(("_png", "_cmyk"))] + [0]
    assert len(picks) == 3
    for i in picks:
        name, label = train.samples[i]
        x, y = train[i]
        assert y == label and torch.equal(x, theirs(Image.open(io.BytesIO(train.read(i))).convert("RGB"))), name
    for split in ("val", "v2"):
        ds = Split(prepared, split, ours)
        x, _ = ds[0]
        assert torch.equal(x, theirs(Image.open(io.BytesIO(ds.read(0))).convert("RGB")))


def test_a3_is_evaluated_at_its_test_size(tmp_path, prepared):
    """A3 trains at 160 but is evaluated at 224 (the paper's table); scaled alike in the mini run."""
    from conftest import write_params
    from rsb.config import load_params, resolve

    paper = load_params(write_params(tmp_path / "p.yaml", prepared, {"scale.img_size": 224}))
    r = resolve(paper, "resnet18", "a3", world_size=1)
    assert (r.img_size, r.test_img_size) == (160, 224)


