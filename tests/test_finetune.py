"""The transfer study (paper figure 7): downstream datasets, fine-tuning starts, the finetune stage and its report."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm_reference as ref
import torch
import yaml
from conftest import ROOT, clean_env, write_params
from test_train import assert_same_run, read_outputs, recorded_grads

from rsb import transfer
from rsb.config import ConfigError, load_params, resolve
from rsb.data import folder, mini
from rsb.data.downstream import DATASETS, classes, write_downstream
from rsb.io import load_weights
from rsb.models import create_model

ARCH = "test_resnet"


@pytest.fixture(scope="session")
def downstream(tmp_path_factory) -> Path:
    """Both downstream sets, small: 12 classes x 14 train (10 updates of 16 per epoch) / 4 val images, 40 px."""
    out = tmp_path_factory.mktemp("downstream")
    write_downstream(out, seed=0, image_size=40, train_per_class=14, val_per_class=4)
    return out


def tparams(tmp_path: Path, prepared: Path, root: Path, overrides: dict | None = None) -> Path:
    return write_params(
        tmp_path / "params.yaml",
        prepared,
        {
            "train.precision": "fp32",
            "transfer.arch": ARCH,
            "transfer.root": str(root),
            "transfer.datasets": ["patterns"],
            "transfer.starts": ["scratch"],
            "transfer.weights": {},
            "transfer.epochs": 0.01,
            "transfer.lr_factor": 1.0,
            **(overrides or {}),
        },
    )


def save_pth(path: Path, arch: str = ARCH, seed: int = 123) -> dict:
    """A torch state dict file as torchvision's and most checkpoints are (torch.save), from a seeded timm model."""
    torch.manual_seed(seed)
    state = timm.create_model(arch).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


# --- downstream datasets -------------------------------------------------------------------------------------------


def test_downstream_sets_are_imagefolder_sets_of_new_concepts_in_the_minis_vocabulary(downstream, tmp_path):
    for name in DATASETS:
        info = folder.check(downstream / name)
        assert info["classes"] == [c for c, _ in classes(name)] and len(info["classes"]) == 12
        assert info["images"] == {"train": 12 * 14, "val": 12 * 4}
        assert folder.Folder(downstream / name, "val").classes == info["classes"]  # ImageFolder's index order
    concepts = [c for name in DATASETS for _, c in classes(name)]
    assert all(c["hue"] in mini.HUES for c in concepts), "colour families are the mini's"
    textures = {c["texture"] for c in concepts if "texture" in c}
    assert textures and not textures & set(mini.TEXTURES), "patterns are textures the mini never shows"
    assert {c["shape"] for c in concepts if "shape" in c} == set(mini.SHAPES), "outlines are the mini's nuisance"
    again = tmp_path / "again"
    write_downstream(again, seed=0, image_size=40, train_per_class=14, val_per_class=4)

    def digest(root: Path) -> str:
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.JPEG")))).hexdigest()

    assert digest(again) == digest(downstream), "the same seed writes the same bytes"


@pytest.mark.parametrize(
    "damage, says",
    [
        (lambda r: shutil.rmtree(r), "no such dataset folder"),
        (lambda r: shutil.rmtree(r / "val"), "val: no such folder"),
        (lambda r: shutil.rmtree(r / "val" / "dots-red"), "different class folders (in one only: dots-red)"),
        (lambda r: [f.unlink() for f in (r / "train" / "rings-green").iterdir()], "rings-green: no images"),
        (
            lambda r: [shutil.rmtree(d) for s in ("train", "val") for d in sorted((r / s).iterdir())[1:]],
            "1 class folder",
        ),
    ],
)
def test_a_bad_dataset_folder_is_one_clear_error(downstream, tmp_path, damage, says):
    root = tmp_path / "patterns"
    shutil.copytree(downstream / "patterns", root)
    damage(root)
    with pytest.raises(folder.FolderError, match=r"patterns.*" + __import__("re").escape(says)):
        folder.check(root)


# --- starts --------------------------------------------------------------------------------------------------------


def test_torchvision_weights_start_the_model_as_train_py_pretrained_path_does(tmp_path, prepared):
    """The 'PyTorch default' row: torchvision's ResNet-50 state dict (.pth, loaded weights-only) becomes a start;
    the fine-tune's model is timm train.py's `--pretrained --pretrained-path <start> --num-classes 12`: every
    backbone tensor is torchvision's, the classifier is the fresh one of the same seed on both sides."""
    import torchvision

    torch.manual_seed(7)
    tv = torchvision.models.resnet50().state_dict()
    torch.save(tv, tmp_path / "resnet50-tv.pth")
    start = tmp_path / "starts" / "pytorch.safetensors"
    meta = transfer.import_start(tmp_path / "resnet50-tv.pth", "resnet50", start)
    assert meta["tensors"] == len(tv) - 2 and json.loads(start.with_suffix(".json").read_text()) == meta
    p = tparams(tmp_path, prepared, tmp_path, {"transfer.arch": "resnet50"})
    params = load_params(p)
    r = resolve(params, "resnet50", "ft", scale=params.transfer.scale(params.scale))
    torch.manual_seed(r.train.seed)  # as rsb.training.train seeds before creating the model
    ours = create_model(r, 12, start).state_dict()
    args = ref.args_for(
        yaml.safe_load(p.read_text()), "ft", "resnet50", 12, r.micro_batch, 1, r.grad_accum, pretrained_path=str(start)
    )
    theirs = ref.model_of_rank(args).state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(torch.equal(ours[k], v) for k, v in tv.items() if not k.startswith("fc.")), "torchvision's tensors"
    assert ours["fc.weight"].shape == (12, 2048)
    torch.manual_seed(r.train.seed)
    assert not torch.equal(create_model(r, 12).state_dict()["layer1.0.conv1.weight"], ours["layer1.0.conv1.weight"])


def test_a_vit_start_of_another_grid_size_loads_as_train_py_loads_it(tmp_path, prepared):
    """A ViT trained at the scaled 32 px (a 2 x 2 patch grid) starts a fine-tune: timm's loader resamples its
    position embedding to the model's grid, on both sides; every other tensor must still match exactly."""
    torch.manual_seed(3)
    torch.save(timm.create_model("test_vit", img_size=32).state_dict(), tmp_path / "vit.pth")
    start = tmp_path / "vit.safetensors"
    transfer.import_start(tmp_path / "vit.pth", "test_vit", start)
    p = tparams(tmp_path, prepared, tmp_path, {"transfer.arch": "test_vit"})
    params = load_params(p)
    r = resolve(params, "test_vit", "ft", scale=params.transfer.scale(params.scale))
    torch.manual_seed(r.train.seed)
    ours = create_model(r, 12, start).state_dict()
    args = ref.args_for(
        yaml.safe_load(p.read_text()), "ft", "test_vit", 12, r.micro_batch, 1, r.grad_accum, pretrained_path=str(start)
    )
    theirs = ref.model_of_rank(args).state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours) and ours["pos_embed"].shape == theirs["pos_embed"].shape
    torch.save(
        {k: (v[:, :1] if k == "blocks.0.attn.qkv.weight" else v) for k, v in torch.load(tmp_path / "vit.pth").items()},
        tmp_path / "bad.pth",
    )
    with pytest.raises(transfer.StartError, match="blocks.0.attn.qkv.weight has shape"):
        transfer.import_start(tmp_path / "bad.pth", "test_vit", tmp_path / "bad.safetensors")


def test_checkpoint_forms_are_unwrapped(tmp_path):
    state = save_pth(tmp_path / "plain.pth")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "ddp.pth")
    for f in ("plain.pth", "ddp.pth"):
        body = transfer.check_start(transfer.read_weights(tmp_path / f), ARCH, tmp_path / f)
        assert body.keys() == transfer.reference_shapes(ARCH).keys()
        assert all(torch.equal(body[k], state[k]) for k in body)


FIRST = next(iter(timm.create_model(ARCH).state_dict()))  # the stem's first convolution


class Code:  # a pickle that would run code under a full unpickler
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "make, says",
    [
        (lambda p: None, "no such weights file"),
        (lambda p: torch.save(timm.create_model("resnet18").state_dict(), p), "not test_resnet weights: it lacks"),
        (
            lambda p: torch.save({**timm.create_model(ARCH).state_dict(), "extra.weight": torch.zeros(1)}, p),
            "it has 'extra.weight', which test_resnet does not",
        ),
        (
            lambda p: torch.save(
                {k: (v[:1] if k == FIRST else v) for k, v in timm.create_model(ARCH).state_dict().items()}, p
            ),
            f"{FIRST} has shape",
        ),
        (lambda p: torch.save({"w": Code()}, p), "not a weights file this can read"),
        (lambda p: torch.save([1, 2], p), "holds no state dict"),
        (lambda p: p.write_bytes(b"\x00" * 100), "not a weights file this can read"),
    ],
)
def test_a_bad_weights_file_is_one_clear_error_before_any_fine_tuning(tmp_path, make, says, capsys):
    src = tmp_path / "weights.pth"
    make(src)
    with pytest.raises(transfer.StartError, match=__import__("re").escape(says)):
        transfer.import_start(src, ARCH, tmp_path / "start.safetensors")
    assert "pwned" not in capsys.readouterr().out, "nothing in the file ran"
    assert not (tmp_path / "start.safetensors").exists() and not (tmp_path / "start.json").exists()


def test_the_starts_stage_refuses_a_name_it_does_not_know(tmp_path, prepared, monkeypatch):
    from stages.starts import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="transfer.weights has no 'nope'"):
        main(["--name", "nope", "--params", str(tparams(tmp_path, prepared, tmp_path))])


@pytest.mark.parametrize(
    "values, says",
    [
        (
            {"transfer.starts": ["a1"]},
            "transfer.starts lists 'a1', which is neither 'scratch' nor under transfer.weights",
        ),
        ({"transfer.weights": {"scratch": "x.pth"}}, "transfer.weights = {'scratch': 'x.pth'}: must be a mapping"),
        ({"transfer.recipe": "ftx"}, "transfer.recipe is recipe 'ftx', which is not under recipes"),
        ({"transfer.arch": "resnet5O"}, "transfer.arch"),
    ],
)
def test_bad_transfer_params_are_one_clear_error(tmp_path, prepared, values, says):
    from rsb.config import check_timm

    with pytest.raises(ConfigError, match=__import__("re").escape(says)):
        check_timm(load_params(tparams(tmp_path, prepared, tmp_path, values)))


# --- the finetune stage --------------------------------------------------------------------------------------------


def finetune_in_process(tmp_path: Path, params: Path, monkeypatch, start: str, dataset: str = "patterns") -> dict:
    from stages.finetune import main

    monkeypatch.chdir(tmp_path)
    with recorded_grads() as grads:
        main(["--start", start, "--dataset", dataset, "--params", str(params)])
    return read_outputs(tmp_path / "studies/transfer", grads, f"{ARCH}-{start}-to-{dataset}")


def test_fine_tuning_updates_equal_train_py_from_the_same_start(tmp_path, prepared, downstream, monkeypatch, world):
    """stages.finetune (one process accumulating 2) against train.py with `--pretrained --pretrained-path` on 2
    processes, over the downstream ImageFolder set: lr, loss and gradient at every one of 10 updates, final weights.
    The start is not the seed's initialization, so a fine-tune that skipped loading it fails from update 1."""
    from stages.starts import main as starts

    monkeypatch.setenv("RSB_TRACKING", "off")
    save_pth(tmp_path / "theirs.pth", seed=123)
    p = tparams(
        tmp_path,
        prepared,
        downstream,
        {
            "transfer.starts": ["other"],
            "transfer.weights": {"other": str(tmp_path / "theirs.pth")},
            "recipes.ft.warmup_epochs": 40,
            "train.eval_every": 0,
            "scale.min_epochs": 1,
            "scale.epochs": 0.03,
        },
    )  # transfer.epochs rules
    monkeypatch.chdir(tmp_path)
    starts(["--name", "other", "--params", str(p)])
    ours = finetune_in_process(tmp_path, p, monkeypatch, "other")
    raw = yaml.safe_load(p.read_text())
    args = ref.args_for(
        raw,
        "ft",
        ARCH,
        12,
        8,
        2,
        1,
        pretrained_path=str(tmp_path / "studies/transfer/starts/other.safetensors"),
        overrides={"recipes.ft.warmup_epochs": 40},
    )
    theirs = ref.run(args, downstream / "patterns" / "train", 2, val_dir=downstream / "patterns" / "val")
    assert theirs.info["updates_per_epoch"] == 10 and theirs.info["loss"] == "LabelSmoothingCrossEntropy"
    assert_same_run(ours, theirs, updates=10)


def test_fine_tunes_report_and_are_children_of_the_transfer_study_in_a_real_store(
    tmp_path, prepared, downstream, monkeypatch, world
):
    """Two starts (scratch, a .pth file) on both downstream sets through the stages, then the report: one MLflow run
    per (start, dataset), tagged and with its dataset input, all children of the transfer study's parent run."""
    from mlflow.tracking import MlflowClient

    from stages.starts import main as starts
    from stages.studies import main as report

    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    save_pth(tmp_path / "elsewhere" / "w.pth")
    p = tparams(
        tmp_path,
        prepared,
        downstream,
        {
            "transfer.starts": ["scratch", "w"],
            "transfer.datasets": ["patterns", "outlines"],
            "transfer.weights": {"w": str(tmp_path / "elsewhere" / "w.pth")},
            "evaluate.batch_size": 20,
        },
    )  # 48 val images: batches 20, 20, 8
    monkeypatch.chdir(tmp_path)
    for name in ("scratch", "w"):
        starts(["--name", name, "--params", str(p)])
        for dataset in ("patterns", "outlines"):
            finetune_in_process(tmp_path, p, monkeypatch, name, dataset)
    metrics = report(["transfer", "--params", str(p), "--out", str(tmp_path / "reports")])
    assert set(metrics) >= {"transfer/scratch-patterns_top1", "transfer/w-outlines_top1", "transfer/w_mean_top1"}
    # the fine-tune's evaluation (its validation after the last epoch) is timm's validate.py on its weights, and it is
    # the number the report shows
    raw = yaml.safe_load(p.read_text())
    args = ref.args_for(raw, "ft", ARCH, 12, 8, 2, 1, pretrained_path="(sizes only)")
    for name in ("scratch", "w"):
        for dataset in ("patterns", "outlines"):
            run = tmp_path / "studies/transfer"
            ours = json.loads((run / "metrics/train" / f"{ARCH}-{name}-to-{dataset}.json").read_text())
            theirs = ref.validate_py(
                ref.validate_py_args(
                    args,
                    downstream / dataset / "val",
                    run / "models" / f"{ARCH}-{name}-to-{dataset}.safetensors",
                    raw["evaluate"]["batch_size"],
                )
            )
            assert (round(ours["val/top1"], 4), round(ours["val/top5"], 4), ours["val/count"]) == (
                theirs["top1"],
                theirs["top5"],
                theirs["count"],
            ), (name, dataset)
            assert metrics[f"transfer/{name}-{dataset}_top1"] == ours["val/top1"]
    md = (tmp_path / "reports/transfer.md").read_text()
    assert "NOT comparable to the paper's ImageNet numbers" in md and "| w | " in md and "| scratch | " in md
    assert "(76.13)" not in md  # no 'pytorch' start here: no published number is shown for it
    assert (tmp_path / "reports/transfer.png").is_file() and (tmp_path / "reports/transfer.csv").is_file()

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rsb").experiment_id
    (parent,) = client.search_runs([exp], "tags.`rsb.kind` = 'study' and tags.`rsb.study` = 'transfer'")
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted((c.data.tags["rsb.start"], c.data.tags["rsb.dataset"]) for c in children) == [
        ("scratch", "outlines"),
        ("scratch", "patterns"),
        ("w", "outlines"),
        ("w", "patterns"),
    ]
    for c in children:
        assert c.data.tags["rsb.kind"] == "finetune" and c.data.tags["rsb.study"] == "transfer"
        assert (
            c.data.tags["rsb.stage"]
            == f"studies/dvc.yaml:finetune@{c.data.tags['rsb.start']}-{c.data.tags['rsb.dataset']}"
        )
        assert "val/top1" in c.data.metrics and c.info.status == "FINISHED"
        assert c.data.tags["rsb.scale"].startswith("epochs x0.01, "), "the fine-tune's own factor (transfer.epochs)"
        (inp,) = c.inputs.dataset_inputs
        assert inp.dataset.name == f"{c.data.tags['rsb.dataset']} train"
    assert not client.search_model_versions(f"name = 'rsb-{ARCH}'"), "fine-tunes are not registered as models"


def test_fine_tuning_refuses_missing_starts_datasets_and_other_architectures(
    tmp_path, prepared, downstream, monkeypatch
):
    from stages.finetune import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = tparams(tmp_path, prepared, downstream)
    with pytest.raises(ConfigError, match="starts/scratch.safetensors: no such start"):
        main(["--start", "scratch", "--dataset", "patterns", "--params", str(p)])
    transfer.scratch_start("resnet18", 0, tmp_path / "studies/transfer/starts/scratch.safetensors")
    with pytest.raises(ConfigError, match="a start of resnet18, but transfer.arch is test_resnet"):
        main(["--start", "scratch", "--dataset", "patterns", "--params", str(p)])
    transfer.scratch_start(ARCH, 0, tmp_path / "studies/transfer/starts/scratch.safetensors")
    with pytest.raises(folder.FolderError, match="pets: no such dataset folder"):
        main(["--start", "scratch", "--dataset", "pets", "--params", str(p)])
    assert not (tmp_path / "checkpoints").exists(), "nothing started"


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_to_identical_weights(tmp_path, prepared, downstream):
    """kill -9 between epochs 1 and 2 of a 3-epoch fine-tune, then the same command: the weights and metrics of an
    uninterrupted fine-tune, bit for bit."""
    name = f"{ARCH}-w-to-patterns"
    results = {}
    for case in ("straight", "killed"):
        d = tmp_path / case
        d.mkdir()
        save_pth(d / "w.pth")
        p = tparams(
            d,
            prepared,
            downstream,
            {"transfer.starts": ["w"], "transfer.weights": {"w": str(d / "w.pth")}, "transfer.epochs": 0.03},
        )
        env = clean_env(RSB_TRACKING="off")
        subprocess.run(
            [sys.executable, "-m", "stages.starts", "--name", "w", "--params", str(p)],
            cwd=d,
            env=env,
            check=True,
            capture_output=True,
        )
        args = ["stages.finetune", "--start", "w", "--dataset", "patterns", "--params", str(p)]
        if case == "killed":
            out = subprocess.run(
                [sys.executable, str(ROOT / "tests/fault_worker.py"), "between-epochs", *args],
                cwd=d,
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
            assert not (d / "studies/transfer/models" / f"{name}.safetensors").exists()
        out = subprocess.run([sys.executable, "-m", *args], cwd=d, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        if case == "killed":
            assert "at epoch 1/3" in out.stdout
        results[case] = (
            load_weights(d / "studies/transfer/models" / f"{name}.safetensors"),
            json.loads((d / "studies/transfer/metrics/train" / f"{name}.json").read_text()),
        )
    (wa, ma), (wb, mb) = results["straight"], results["killed"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ma["val/top1"] == mb["val/top1"] and ma["train/loss"] == mb["train/loss"] and ma["epochs"] == 3
