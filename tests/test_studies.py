"""The studies (seed study, cost vs accuracy, recipes across architectures): statistics on hand-made inputs, the
reports' scale statement and published numbers, the parent/child runs in a real MLflow store, a killed seed run."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import clean_env, write_params

from rsb import tracking
from rsb.config import ConfigError, load_params
from rsb.data.datasets import Split
from rsb.io import load_weights
from rsb.outputs import Outputs
from rsb.studies import common, procedures, seeds


def rows(*values) -> list[dict]:
    """(seed, val, real, v2) -> the rows seed_rows() returns."""
    return [{"seed": s, "val": v, "real": r, "v2": w, "run_id": None, "train_s": None} for s, v, r, w in values]


# --- statistics -----------------------------------------------------------------------------------------------------


def test_statistics_match_the_standard_library_on_hand_made_values():
    data = rows((1, 79.8, 85.0, 68.1), (2, 80.0, 85.3, 67.9), (3, 79.7, 85.1, 68.4), (4, 79.9, 85.2, 68.0))
    s = seeds.summarize(data)
    for split in ("val", "real", "v2"):
        vals = [r[split] for r in data]
        got = s["splits"][split]
        assert got["n"] == 4 and got["mean"] == pytest.approx(statistics.mean(vals))
        assert got["std"] == pytest.approx(statistics.stdev(vals))  # sample std, n - 1
        assert (got["min"], got["max"]) == (min(vals), max(vals))
    assert s["splits"]["val"]["seed_of_max"] == 2 and s["splits"]["v2"]["seed_of_max"] == 3
    assert s["pearson_val_v2"] == pytest.approx(
        statistics.correlation([r["val"] for r in data], [r["v2"] for r in data])
    )
    assert s["missing"] == []
    assert common.binomial_se(80.0, 50_000) == pytest.approx(100 * (0.8 * 0.2 / 50_000) ** 0.5)
    assert common.binomial_se(80.0, None) is None


def test_one_seed_has_a_mean_but_no_std_or_correlation():
    s = seeds.summarize(rows((7, 80.1, 85.0, 68.0)))
    assert s["splits"]["val"]["mean"] == 80.1 and s["splits"]["val"]["std"] is None
    assert s["pearson_val_v2"] is None
    md = seeds.seeds_markdown("resnet50", "a2", rows((7, 80.1, 85.0, 68.0)), s, "caption")
    assert "| ImageNet-val | 1 | 80.10 |  |" in md, "an undefined std is an empty cell, never 0"
    assert "undefined (fewer than 3 seeds)" in md


def test_a_missing_evaluation_is_left_out_and_named():
    data = rows((1, 79.8, 85.0, 68.1), (2, None, None, None), (3, 79.6, 84.9, 68.5), (4, 80.2, 85.4, 68.2))
    s = seeds.summarize(data)
    assert s["missing"] == [2] and s["splits"]["val"]["n"] == 3
    assert s["splits"]["val"]["std"] == pytest.approx(statistics.stdev([79.8, 79.6, 80.2]))
    assert s["splits"]["val"]["seed_of_max"] == 4
    md = seeds.seeds_markdown("resnet50", "a2", data, s, "caption")
    assert "**not evaluated: 2**" in md


def test_ties_give_the_first_seed_and_a_constant_side_has_no_correlation():
    s = seeds.summarize(rows((5, 80.0, 85.0, 68.0), (6, 80.0, 85.0, 69.0), (7, 79.0, 85.0, 67.0)))
    assert s["splits"]["val"]["seed_of_max"] == 5
    assert common.pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None
    assert common.pearson([1.0, 2.0], [3.0, 1.0]) is None, "two pairs always give -1 or 1: not a measurement"
    with pytest.raises(ValueError):
        common.pearson([1.0, 2.0], [1.0])


def test_the_seed_table_carries_the_papers_published_statistics_and_nothing_invented():
    s = seeds.summarize(rows((1, 79.8, 85.0, 68.1), (2, 80.0, 85.3, 67.9), (3, 79.7, 85.1, 68.4)))
    table = {r["split"]: r for r in seeds.seeds_table(s)}
    assert table["val"]["paper_std"] == 0.1 and table["v2"]["paper_std"] == 0.23
    assert table["real"]["paper_std"] is None and table["val"]["paper_mean"] is None
    assert "seeds 1-100" in table["val"]["paper_source"]


# --- reports state their scale --------------------------------------------------------------------------------------


def test_every_study_report_states_its_scale(tmp_path, prepared, monkeypatch):
    """A study run on the mini data says so in each report; the paper's settings say "Paper scale"."""
    from stages import studies as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    params = load_params(write_params(tmp_path / "params.yaml", prepared, {"seeds.arch": "test_resnet"}))
    for name, top1 in (("a1", 50.0), ("a3", 40.0)):
        _fake(Outputs.of("test_resnet", name), top1)
    for seed in params.seeds.seeds[:3]:
        _fake(Outputs.of("test_resnet", params.seeds.recipe, "seeds", seed), 30.0 + seed)
    for study in ("seeds", "cost", "architectures"):
        stage.main([study, "--params", str(tmp_path / "params.yaml")])
        md = (tmp_path / "reports" / f"{study}.md").read_text()
        assert "NOT comparable to the paper's ImageNet numbers" in md and "mini data" in md, study
        assert (tmp_path / "reports" / f"{study}.png").read_bytes()[:4] == b"\x89PNG"
    seeds = (tmp_path / "reports/seeds.md").read_text()
    assert "not evaluated: 4, 5, 6, 7, 8" in seeds and "| ImageNet-val | 3 | 32.00 | 1.000 |" in seeds
    cost = (tmp_path / "reports/cost.md").read_text()
    assert (
        "| test_resnet | a1 | 3 | 1 | cpu: test | " in cost
        and "| resnet50 | a1 | 600 | 4 | V100 32GB | 110.4 | 441.6 |" in cost
    )
    arch = (tmp_path / "reports/architectures.md").read_text()
    assert "| test_resnet | 50.00 () | 40.00 () | a1 () | 84 |" in arch  # (40 s train + 2 s evaluate) x 2 recipes


def test_scale_text_names_the_paper_scale_only_at_paper_scale(tmp_path, prepared):
    from rsb.report import scale_text

    paper = load_params(
        write_params(
            tmp_path / "p.yaml", prepared, {"scale.epochs": 1.0, "scale.img_size": 224, "scale.batch_size": 2048}
        )
    )
    assert scale_text(paper, {"source": "imagenet"}).startswith("Paper scale")
    assert "NOT comparable" in scale_text(paper, {"source": "mini", "classes": 20})


def _fake(o: Outputs, top1: float) -> None:
    """The JSON outputs of one trained and evaluated model, as the train and evaluate stages write them."""
    for path, data in (
        (
            o.train_metrics,
            {"epochs": 3, "devices": 1, "train/wall_s": 36.0, "device_hours": 0.01, "train/stage_s": 40.0},
        ),
        (o.eval_metrics, {"val/top1": top1, "real/top1": top1 + 5, "v2/top1": top1 - 10, "eval_s": 2.0}),
        (o.run_file, {"run_id": None, "tags": {"rsb.device": "cpu: test"}}),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


# --- MLflow: one parent run per study, its trainings as children ----------------------------------------------------


def test_a_studys_trainings_are_children_of_its_parent_run_in_a_real_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.delenv("RSB_TRACKING", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setattr(tracking.store, "project_root", lambda cwd=None: tmp_path)
    client = MlflowClient(store)
    exp = tracking.experiment_id(client, "rsb")
    seeds = [client.create_run(exp, run_name=f"r18-a3-seed{s}").info.run_id for s in (1, 2, 3)]
    report = tmp_path / "seeds.md"
    report.write_text("# Seed study\n")
    first = tracking.study_run("rsb", "seeds", "r18-a3, 3 seeds", {"seeds/val_std": 0.4}, [report], seeds, "h", None)
    parent = client.get_run(first)
    assert parent.data.tags["rsb.kind"] == "study" and parent.data.metrics["seeds/val_std"] == 0.4
    assert [a.path for a in client.list_artifacts(first, "report")] == ["report/seeds.md"]
    for run_id in seeds:
        assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == first
    # a second study (after a change: one seed retrained) is a new parent; the first keeps its record
    retrained = client.create_run(exp, run_name="r18-a3-seed3").info.run_id
    second = tracking.study_run(
        "rsb", "seeds", "r18-a3, 3 seeds", {"seeds/val_std": 0.3}, [report], [*seeds[:2], retrained], "h", None
    )
    assert second != first and client.get_run(retrained).data.tags["mlflow.parentRunId"] == second
    assert client.get_run(seeds[2]).data.tags["mlflow.parentRunId"] == first
    assert client.get_run(first).data.tags["rsb.children"].split(",") == seeds
    studies_runs = client.search_runs([exp], "tags.`rsb.kind` = 'study'")
    assert {r.data.metrics["seeds/val_std"] for r in studies_runs} == {0.4, 0.3}


# --- params -------------------------------------------------------------------------------------------------------


def test_a_seed_study_of_an_unknown_recipe_or_architecture_is_refused(tmp_path, prepared):
    from rsb.config import check_timm

    with pytest.raises(ConfigError, match=r"seeds.recipe is recipe 'a9', which is not under recipes"):
        load_params(write_params(tmp_path / "a.yaml", prepared, {"seeds.recipe": "a9"}))
    params = load_params(write_params(tmp_path / "b.yaml", prepared, {"seeds.arch": "resnet5O"}))
    with pytest.raises(ConfigError, match=r"seeds.arch: 'resnet5O' is not a timm architecture"):
        check_timm(params)
    with pytest.raises(ConfigError, match=r"seeds.seeds = \[1, 1\]: must be a non-empty list of distinct"):
        load_params(write_params(tmp_path / "c.yaml", prepared, {"seeds.seeds": [1, 1]}))
    with pytest.raises(ConfigError, match=r"procedures.recipes lists recipe 't3', which is not under recipes"):
        load_params(write_params(tmp_path / "d.yaml", prepared, {"procedures.recipes": ["a2", "t3"]}))
    params = load_params(write_params(tmp_path / "e.yaml", prepared, {"procedures.models": ["resnet50", "deit_s"]}))
    with pytest.raises(ConfigError, match=r"procedures.models: 'deit_s' is not a timm architecture"):
        check_timm(params)


# --- a killed seed run resumes --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_seed_run_resumes_and_equals_an_uninterrupted_one(tmp_path, prepared):
    """kill -9 between epochs of `stages.train --study seeds --seed 3`, then the same command (what `dvc repro
    studies/dvc.yaml` reruns): it resumes from epoch 1 and ends bit-identical to a straight seed-3 run, which differs
    from seed 4's (the seed reaches the training)."""
    import torch
    from test_reliability import FAULTS, run

    from rsb.io import load_weights

    over = {"scale.min_epochs": 3, "train.workers": 1, "seeds.arch": "test_resnet", "seeds.recipe": "a1"}
    weights = {}
    for case, seed, fault in (("killed", 3, "between-epochs"), ("straight", 3, None), ("other", 4, None)):
        d = tmp_path / case
        d.mkdir()
        p = write_params(d / "params.yaml", prepared, over)
        args = [
            "stages.train",
            "--arch",
            "test_resnet",
            "--recipe",
            "a1",
            "--study",
            "seeds",
            "--seed",
            str(seed),
            "--params",
            str(p),
        ]
        o = Outputs.of("test_resnet", "a1", "seeds", seed, root=d)
        if fault:
            out = run(d, str(FAULTS), fault, *args)
            assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
            assert not o.weights.exists(), "a killed seed run must not look finished"
        out = run(d, "-m", *args)
        assert out.returncode == 0, out.stderr[-3000:]
        if fault:
            assert "at epoch 1/3" in out.stdout
        assert json.loads(o.run_file.read_text())["resolved"]["train"]["seed"] == seed
        assert (d / "checkpoints" / f"test_resnet-a1-seed{seed}").is_dir() and not (d / "models").exists()
        weights[case] = load_weights(o.weights)
    same = all(torch.equal(weights["killed"][k], weights["straight"][k]) for k in weights["straight"])
    assert same, "the resumed seed run differs from an uninterrupted one"
    assert not all(torch.equal(weights["other"][k], weights["straight"][k]) for k in weights["straight"])


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU slots need two cores")
def test_two_seeds_side_by_side_equal_the_same_seeds_in_turn(tmp_path, prepared):
    """train.slots: 2 on the CPU: seeds 1 and 2 start together through rsb.launch (as `dvc queue start -j 2` starts
    them), each claims its own slot (its own core) and trains there; their weights, evaluations and seed-report rows
    equal those of the same seeds trained one after another with the whole node, bit for bit."""
    from rsb.studies.seeds import seed_rows

    over = {"seeds.arch": "test_resnet", "seeds.recipe": "a3", "seeds.seeds": [1, 2], "train.slots": 2}
    env = clean_env(RSB_TRACKING="off", RSB_SLOT_DIR=str(tmp_path / "slots"), CUDA_VISIBLE_DEVICES="")

    def stage(d: Path, module: str, seed: int, slots: int) -> subprocess.Popen:
        args = ["--arch", "test_resnet", "--recipe", "a3", "--study", "seeds", "--seed", str(seed)]
        launch = (
            [sys.executable, "-m", "rsb.launch", "--slots", str(slots), module]
            if module == "stages.train"
            else [sys.executable, "-m", module]
        )
        return subprocess.Popen(
            [*launch, *args, "--params", str(d / "params.yaml")],
            cwd=d,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def finish(procs: list[subprocess.Popen]) -> None:
        for pr in procs:
            out, err = pr.communicate(timeout=600)
            assert pr.returncode == 0, err[-3000:]

    side, turn = tmp_path / "side", tmp_path / "turn"
    for d in (side, turn):
        d.mkdir()
        write_params(d / "params.yaml", prepared, over)
    finish([stage(side, "stages.train", 1, 2), stage(side, "stages.train", 2, 2)])  # at once
    for seed in (1, 2):
        finish([stage(turn, "stages.train", seed, 0)])
    for d in (side, turn):
        finish([stage(d, "stages.evaluate", seed, 0) for seed in (1, 2)])
    slots = {
        json.loads(Outputs.of("test_resnet", "a3", "seeds", s, side).run_file.read_text())["tags"]["rsb.slot"]
        for s in (1, 2)
    }
    assert {s.split(" (")[0] for s in slots} == {"slot 0 of 2", "slot 1 of 2"}, slots
    for seed in (1, 2):
        a, b = (load_weights(Outputs.of("test_resnet", "a3", "seeds", seed, d).weights) for d in (side, turn))
        assert all(torch.equal(a[k], b[k]) for k in a), f"seed {seed}: weights differ"
    drop = ("run_id", "train_s")
    rows = [
        [{k: v for k, v in r.items() if k not in drop} for r in seed_rows("test_resnet", "a3", [1, 2], d)]
        for d in (side, turn)
    ]
    assert rows[0] == rows[1], "the seed report's rows"
    assert rows[0][0] != rows[0][1], "two seeds, two results"


def test_a_seed_run_trains_with_its_seed_into_the_studys_folders(tmp_path, prepared, monkeypatch):
    """`stages.train --study seeds --seed 5` (what studies/dvc.yaml runs): train.seed is 5 in the resolved recipe
    and the MLflow tags, and every output lands under studies/seeds/ (none in the grid's folders); `stages.evaluate`
    scores it there."""
    from stages.evaluate import main as evaluate
    from stages.train import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = str(write_params(tmp_path / "params.yaml", prepared, {"seeds.arch": "test_resnet", "seeds.recipe": "a3"}))
    args = ["--arch", "test_resnet", "--recipe", "a3", "--study", "seeds", "--seed", "5", "--params", p]
    metrics = train(args)
    o = Outputs.of("test_resnet", "a3", "seeds", 5)
    info = json.loads(o.run_file.read_text())
    assert info["resolved"]["train"]["seed"] == 5 and info["tags"]["rsb.seed"] == "5"
    assert info["tags"]["rsb.study"] == "seeds" and o.weights.is_file() and o.history.is_file()
    assert metrics["devices"] == 1 and metrics["device_hours"] == pytest.approx(metrics["train/wall_s"] / 3600)
    assert metrics["train/wall_s"] >= metrics["train/time_s"] > 0
    assert not any((tmp_path / d).exists() for d in ("models", "runs", "metrics", "plots"))
    assert evaluate(args)["val/count"] > 0 and o.eval_metrics.is_file()


# --- the recipe/architecture paradox (A2 vs T2) ---------------------------------------------------------------------


def test_the_procedures_report_says_whether_the_ordering_flips(tmp_path, prepared, monkeypatch):
    from stages import studies as stage

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = write_params(
        tmp_path / "params.yaml",
        prepared,
        {"procedures.models": ["resnet50", "deit_small_patch16_224"], "procedures.recipes": ["a2", "t2"]},
    )
    cells = {
        ("resnet50", "a2"): 30.0,
        ("resnet50", "t2"): 25.0,
        ("deit_small_patch16_224", "a2"): 28.0,
        ("deit_small_patch16_224", "t2"): 27.0,
    }
    for (arch, recipe), top1 in cells.items():
        _fake(Outputs.of(arch, recipe, "procedures"), top1)
    stage.main(["procedures", "--params", str(p)])
    md = (tmp_path / "reports/procedures.md").read_text()
    assert (
        "| resnet50 | 30.00 (79.8) | 25.00 () |" in md and "| deit_small_patch16_224 | 28.00 () | 27.00 (79.9) |" in md
    )
    assert "Ours: under a2 resnet50 wins; under t2 deit_small_patch16_224 wins: **the ordering flips**." in md
    assert "Published: undecided (a cell is missing)." in md, "unverified cells stay empty, so no published verdict"
    assert "NOT comparable to the paper's ImageNet numbers" in md
    _fake(Outputs.of("deit_small_patch16_224", "t2", "procedures"), 24.0)
    stage.main(["procedures", "--params", str(p)])
    assert "resnet50 wins: the same architecture wins" in (tmp_path / "reports/procedures.md").read_text()
    # with a split's size known, a lead under two binomial standard errors of the difference is a tie, not a flip
    rows = [
        {"arch": a, "recipe": rc, "val_top1": v, "val_count": 500}
        for a, rc, v in (("r", "a2", 23.8), ("d", "a2", 5.0), ("r", "t2", 5.0), ("d", "t2", 5.4))
    ]
    assert procedures.winners(rows, "val_top1") == {"a2": "r", "t2": procedures.TIE}
    md = procedures.procedures_markdown(
        [{**r, "v2_top1": None, "paper_val_top1": None, "paper_source": None} for r in rows], "c"
    )
    assert "under t2 a tie within noise: no ordering to compare" in md and "flips" not in md


def test_a_vit_trains_and_evaluates_at_the_scaled_size(tmp_path, prepared, monkeypatch):
    """test_vit (timm's small ViT) through the train and evaluate stages at 32 px under T2, in the procedures
    study's folders: built for 32 px on both sides, so its weights load and it scores every val image."""
    from stages.evaluate import main as evaluate
    from stages.train import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = str(write_params(tmp_path / "params.yaml", prepared, {"procedures.models": ["test_vit"]}))
    args = ["--arch", "test_vit", "--recipe", "t2", "--study", "procedures", "--params", p]
    train(args)
    metrics = evaluate(args)
    assert metrics["val/count"] == Split(prepared, "val").__len__() and metrics["transform"]["crop_pct"] == 0.875
    o = Outputs.of("test_vit", "t2", "procedures")
    assert o.eval_metrics.is_file()
    # T2 keeps DeiT's model EMA: its own weights in the study's EMA folder, scored beside the model, in the report
    info = json.loads((o.ema_dir / "ema.json").read_text())
    assert info["model_ema"] and o.ema_weights.is_file() and 0 < info["decay_per_update"] < 0.99996
    assert info["decay_per_update"] == pytest.approx(0.99996 ** (300 * 625 / info["updates"]), rel=1e-12)
    assert metrics["ema/val/count"] == metrics["val/count"] and "ema/real/top1" in metrics and "ema/v2/top1" in metrics
    from stages import studies as stage

    stage.main(["procedures", "--params", p])
    md = (tmp_path / "reports/procedures.md").read_text()
    assert "## With and without the model EMA (DeiT's --model-ema)" in md
    row = f"| test_vit | t2 | {metrics['val/top1']:.2f} | {metrics['ema/val/top1']:.2f} |"
    assert row in md, md


def test_a_model_ema_is_kept_only_where_its_weights_are_declared(tmp_path, prepared, monkeypatch):
    """A recipe with model_ema trained in the grid (whose DVC stage declares no EMA folder) is refused before any
    work, in one line naming the key and the study that keeps one."""
    from stages.train import main as train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RSB_TRACKING", "off")
    p = str(write_params(tmp_path / "params.yaml", prepared, {"recipes.a3.model_ema": True}))
    with pytest.raises(ConfigError, match=r"recipes.a3.model_ema: true, but only the procedures study's stages"):
        train(["--arch", "test_resnet", "--recipe", "a3", "--params", p])
    assert not (tmp_path / "checkpoints").exists()
