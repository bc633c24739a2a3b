"""The studies end to end: `dvc repro studies/dvc.yaml` in a temporary git copy of the project after the default
pipeline's first repro, on test_pipeline's tiny profile. A file of its own so that it runs beside the default
pipeline's tests (pytest-xdist gives each file a worker), on a base repro of its own."""
from __future__ import annotations

import re

import pytest

import test_pipeline
from test_pipeline import changed_stages, commit, ran, set_params, sh

built, repo = test_pipeline.built, test_pipeline.repo  # the fixtures: module-scoped, so this file builds its own base

pytestmark = pytest.mark.slow


def test_studies_run_with_one_command_and_rerun_only_what_changed(repo, tmp_path):
    """Every study in one command: two seeds; A1 against T2 on a small ResNet and a small ViT; the transfer study
    from the grid's A1 model, timm's initialization and a .pth file outside the project (an external dependency, as
    torchvision's weights file would be). A second run does nothing; one more seed and a changed weights file rerun
    that seed, that start's fine-tune and their reports, nothing else."""
    import timm
    import torch
    from mlflow.tracking import MlflowClient

    ext = tmp_path / "weights" / "theirs.pth"
    ext.parent.mkdir()
    torch.manual_seed(5)
    torch.save(timm.create_model("test_resnet").state_dict(), ext)
    set_params(repo, {"seeds.arch": "test_resnet", "seeds.recipe": "a3", "seeds.seeds": [1, 2],
                      "procedures.models": ["test_resnet", "test_vit"], "procedures.recipes": ["a1", "t2"],
                      "transfer.arch": "test_resnet", "transfer.starts": ["a1", "scratch", "theirs"],
                      "transfer.weights": {"a1": "models/test_resnet-a1.safetensors", "theirs": str(ext)},
                      "transfer.datasets": ["patterns"], "transfer.epochs": 0.01})
    commit(repo, "a seed study of two seeds; A1 against T2 on a small ResNet and a small ViT; transfer from A1, "
                 "scratch and an outside weights file")
    pairs = [f"{m}-{r}" for m in ("test_resnet", "test_vit") for r in ("a1", "t2")]
    study = {f"studies/dvc.yaml:{s}" for s in ("seed-train@1", "seed-train@2", "seed-evaluate@1", "seed-evaluate@2",
                                               "seeds-report", "cost", "architectures", "procedures-report",
                                               *[f"procedures-{k}@{p}" for k in ("train", "evaluate") for p in pairs],
                                               "transfer-data", "transfer-scratch", "transfer-start@a1",
                                               "transfer-start@theirs",
                                               *[f"finetune@{s}-patterns" for s in ("a1", "scratch", "theirs")],
                                               "transfer-report")}
    assert changed_stages(repo, "studies/dvc.yaml") == study and changed_stages(repo) == set()
    out = sh(repo, "dvc", "repro", "studies/dvc.yaml").stdout
    assert ran(out) == study, out  # the grid's models are reused, not retrained
    for name in ("seeds", "cost", "architectures", "procedures", "transfer"):
        md = (repo / "reports" / f"{name}.md").read_text()
        assert "NOT comparable to the paper's ImageNet numbers" in md, name
        assert (repo / "reports" / f"{name}.csv").is_file() and (repo / "reports" / f"{name}.png").is_file()
    assert "| ImageNet-val | 2 |" in (repo / "reports/seeds.md").read_text()
    assert re.search(r"\| test_vit \| [\d.]+ \(\) \| [\d.]+ \(\) \|", (repo / "reports/procedures.md").read_text())
    md = (repo / "reports/transfer.md").read_text()
    assert "Fine-tuning: recipes.ft" in md
    assert re.search(r"\| a1 \| [\d.]+ \(80.40\) \| [\d.]+ \| [\d.]+ \|", md), md  # the grid's own val top-1
    assert "Running stage" not in sh(repo, "dvc", "repro", "studies/dvc.yaml").stdout
    assert "Running stage" not in sh(repo, "dvc", "repro").stdout, "the default pipeline does not see the studies"
    # one more seed and a changed outside weights file: that seed's training and evaluation, that start and its
    # fine-tune, and the two reports; nothing else
    set_params(repo, {"seeds.seeds": [1, 2, 3]})
    torch.manual_seed(6)
    torch.save(timm.create_model("test_resnet").state_dict(), ext)
    out = sh(repo, "dvc", "repro", "studies/dvc.yaml").stdout
    assert ran(out) == {f"studies/dvc.yaml:{s}" for s in (
        "seed-train@3", "seed-evaluate@3", "seeds-report",
        "transfer-start@theirs", "finetune@theirs-patterns", "transfer-report")}, out
    assert "| ImageNet-val | 3 |" in (repo / "reports/seeds.md").read_text()
    # MLflow: the newest seed study is the parent of the three seed runs
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rsb").experiment_id
    parent = client.search_runs([exp], "tags.`rsb.kind` = 'study' and tags.`rsb.study` = 'seeds'",
                                order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["rsb.seed"] for r in children) == ["1", "2", "3"]
    assert all(r.data.tags["rsb.study"] == "seeds" and "v2/top1" in r.data.metrics for r in children)
    assert "seeds/val_std" in parent.data.metrics and parent.data.metrics["seeds/val_n"] == 3
    ids = {r.info.run_id for r in children}
    assert not [v for v in client.search_model_versions("name = 'rsb-test_resnet'") if v.run_id in ids], \
        "seed replicas are not registered models"
