"""The pipeline end to end: the real `dvc repro` in a temporary git copy of the project, on a tiny profile."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_env

from rsb.config import override

pytestmark = pytest.mark.slow

TINY = {
    "models": ["test_resnet"],
    "run": ["a1", "a3"],
    "data.mini": {
        "seed": 0,
        "classes": 20,
        "train_per_class": 6,
        "val_per_class": 3,
        "v2_per_class": 2,
        "image_size": 48,
    },
    "scale.epochs": 0.004,
    "scale.min_epochs": 1,
    "scale.img_size": 32,
    "scale.batch_size": 16,
    "train.micro_batch": 8,
    "train.workers": 0,
    "train.threads": 1,
    "evaluate.workers": 0,
    "benchmark.img_size": 64,
    "benchmark.batch_size": 8,
    "benchmark.repeats": 2,
    "benchmark.warmup": 1,
}


def sh(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=clean_env(PYTHONPATH=str(cwd)), capture_output=True, text=True, timeout=900)
    if check and out.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def set_params(repo: Path, values: dict) -> None:
    p = override(yaml.safe_load((repo / "params.yaml").read_text()), values)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def changed_stages(repo: Path, target: str = "dvc.yaml") -> set[str]:
    """Stages of `target` (the default pipeline; studies/dvc.yaml for the studies) that `dvc repro` would run."""
    return set(json.loads(sh(repo, "dvc", "status", "--json", target).stdout or "{}"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A git copy of the project's tracked files, with the tiny profile, after one full `dvc repro`, committed and
    tagged `base`."""
    repo = tmp_path_factory.mktemp("project")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for f in filter(None, files):
        if (ROOT / f).is_file() and not f.startswith(("metrics/", "plots/", "runs/", "reports/", "dvc.lock")):
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    set_params(repo, TINY)
    sh(repo, "git", "init", "-q")
    commit(repo, "tiny profile")
    sh(repo, "dvc", "repro")
    commit(repo, "base: one full repro")
    sh(repo, "git", "tag", "base")
    return repo


@pytest.fixture
def repo(built) -> Path:
    """Every test starts from `base`: the committed state after the first repro, its outputs checked out, nothing to
    rerun. (Files git ignores, like checkpoints/ and mlflow.db, carry over: they are the stages' own state.)"""
    sh(built, "git", "reset", "-q", "--hard", "base")
    sh(built, "git", "clean", "-qfd")
    sh(built, "dvc", "checkout", "-q", "--allow-missing")  # studies never run have nothing to check out
    assert changed_stages(built) == set()
    return built


def test_repro_produces_every_output(repo):
    for name in ("test_resnet-a1", "test_resnet-a3"):
        assert (repo / "models" / f"{name}.safetensors").is_file()
        ev = json.loads((repo / "metrics/eval" / f"{name}.json").read_text())
        assert {"val/top1", "real/top1", "v2/top1"} <= set(ev)
        run = json.loads((repo / "runs" / f"{name}.json").read_text())
        assert run["run_id"] and run["resolved"]["arch"] == "test_resnet"
    bench = json.loads((repo / "metrics/benchmark/test_resnet.json").read_text())
    assert bench["img_per_s"] > 0
    rows = list(csv.DictReader(open(repo / "reports/figure4.csv")))
    assert [(r["arch"], r["recipe"]) for r in rows] == [("test_resnet", "a1"), ("test_resnet", "a3")]
    assert "NOT comparable" in (repo / "reports/figure4.md").read_text()
    assert (repo / "mlflow.db").is_file(), "the default store is the project's sqlite file"


def registry(repo: Path) -> tuple[set, dict]:
    """The Model Registry of the project's store: (versions of rsb-test_resnet, {alias: version})."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    versions = {v.version for v in client.search_model_versions("name = 'rsb-test_resnet'")}
    return versions, dict(client.get_registered_model("rsb-test_resnet").aliases)


def test_second_repro_does_nothing(repo):
    before = registry(repo)
    assert set(before[1]) == {"a1", "a3"}
    out = sh(repo, "dvc", "repro").stdout
    assert "Running stage" not in out
    assert registry(repo) == before, "a second repro registers nothing and moves no alias"


def test_metrics_and_plots_show(repo):
    metrics = sh(repo, "dvc", "metrics", "show").stdout
    assert "metrics/eval/test_resnet-a1.json" in metrics and "val/top1" in metrics
    out = sh(repo, "dvc", "plots", "show")
    assert "failed to load" not in out.stdout + out.stderr
    html = (repo / "dvc_plots" / "index.html").read_text()
    assert "train_loss" in html and (repo / "dvc_plots/static/workspace_reports_figure4.png").is_file()


def test_changing_a3_lr_changes_only_a3(repo):
    """DVC's plan for a changed A3 lr is its training alone; the stages after it follow through their deps when it runs
    (test_exp_run_temp_reruns_only_what_changed runs the same change: train, evaluate and report of A3, nothing else),
    and nothing is left to rerun after (the same test's `dvc exp run`, test_killed_dvc_repro_recovers' `dvc repro`)."""
    set_params(repo, {"recipes.a3.lr": 0.007})
    assert changed_stages(repo) == {"train@test_resnet-a3"}


def test_an_edit_to_code_training_imports_reruns_training_and_a_tracking_edit_does_not(repo):
    """compat.py (timm's posterize patched at import) is training code: DVC sees the edit in every train stage (and in
    the stages that import it too: evaluate, benchmark and report, through the transforms and params checks). The
    MLflow logging is records only (rsb.code): editing it reruns nothing."""
    compat = repo / "src/rsb/compat.py"
    compat.write_text(compat.read_text() + "\n# an edit\n")
    assert changed_stages(repo) == {
        "train@test_resnet-a1",
        "train@test_resnet-a3",
        "evaluate@test_resnet-a1",
        "evaluate@test_resnet-a3",
        "benchmark@test_resnet",
        "report",
    }
    sh(repo, "git", "checkout", "--", "src/rsb/compat.py")
    runs = repo / "src/rsb/tracking/runs.py"
    runs.write_text(runs.read_text() + "\n# an edit\n")
    assert changed_stages(repo) == set()
    sh(repo, "git", "checkout", "--", "src/rsb/tracking/runs.py")


def test_an_edit_to_real_scoring_reruns_evaluations_only_and_config_reruns_them_too(repo):
    """ReaL's scorer and label reader are the evaluation's (rsb.evaluation), outside training's imports: an edit
    there makes DVC rerun the evaluate stages and no training. rsb.config decides the evaluation's test size and
    precision: an edit there reruns the evaluate stages as well (dvc.yaml's deps are derived from the imports)."""
    evaluation = repo / "src/rsb/evaluation.py"
    evaluation.write_text(
        evaluation.read_text().replace(
            'out["top5"] += any(p in labels for p in pred[:5])',
            'out["top5"] += any(p in labels for p in pred[:5])  # edit',
        )
    )
    assert changed_stages(repo) == {"evaluate@test_resnet-a1", "evaluate@test_resnet-a3"}
    sh(repo, "git", "checkout", "--", "src/rsb/evaluation.py")
    config = repo / "src/rsb/config.py"
    config.write_text(config.read_text() + "\n# an edit\n")
    assert {"evaluate@test_resnet-a1", "evaluate@test_resnet-a3"} <= changed_stages(repo)
    assert "prepare" not in changed_stages(repo), "prepare imports none of the training's configuration"


def test_adding_an_architecture_adds_only_its_stages(repo):
    """A second architecture in `models`: DVC's plan is its two trainings, two evaluations, its benchmark and the
    report, nothing of the first's (the report's rows in `models` order: tests/test_report.py)."""
    set_params(repo, {"models": ["test_resnet", "test_efficientnet"]})
    new = "test_efficientnet"
    assert changed_stages(repo) == {
        f"train@{new}-a1",
        f"train@{new}-a3",
        f"evaluate@{new}-a1",
        f"evaluate@{new}-a3",
        f"benchmark@{new}",
        "report",
    }


def test_studies_run_with_one_command_and_rerun_only_what_changed(repo, tmp_path):
    """Every study in one command: two seeds; A1 against T2 on a small ResNet and a small ViT; the transfer study
    from the grid's A1 model, timm's initialization and a .pth file outside the project (an external dependency, as
    torchvision's weights file would be). A second run does nothing; one more seed and a changed weights file rerun
    that seed's stages and that start, nothing else (`dvc status`)."""
    import timm
    import torch
    from mlflow.tracking import MlflowClient

    ext = tmp_path / "weights" / "theirs.pth"
    ext.parent.mkdir()
    torch.manual_seed(5)
    torch.save(timm.create_model("test_resnet").state_dict(), ext)
    set_params(
        repo,
        {
            "seeds.arch": "test_resnet",
            "seeds.recipe": "a3",
            "seeds.seeds": [1, 2],
            "procedures.models": ["test_resnet", "test_vit"],
            "procedures.recipes": ["a1", "t2"],
            "transfer.arch": "test_resnet",
            "transfer.starts": ["a1", "scratch", "theirs"],
            "transfer.weights": {"a1": "models/test_resnet-a1.safetensors", "theirs": str(ext)},
            "transfer.datasets": ["patterns"],
            "transfer.epochs": 0.01,
        },
    )
    commit(
        repo,
        "a seed study of two seeds; A1 against T2 on a small ResNet and a small ViT; transfer from A1, "
        "scratch and an outside weights file",
    )
    pairs = [f"{m}-{r}" for m in ("test_resnet", "test_vit") for r in ("a1", "t2")]
    study = {
        f"studies/dvc.yaml:{s}"
        for s in (
            "seed-train@1",
            "seed-train@2",
            "seed-evaluate@1",
            "seed-evaluate@2",
            "seeds-report",
            "cost",
            "architectures",
            "procedures-report",
            *[f"procedures-{k}@{p}" for k in ("train", "evaluate") for p in pairs],
            "transfer-data",
            "transfer-scratch",
            "transfer-start@a1",
            "transfer-start@theirs",
            *[f"finetune@{s}-patterns" for s in ("a1", "scratch", "theirs")],
            "transfer-report",
        )
    }
    assert changed_stages(repo, "studies/dvc.yaml") == study and changed_stages(repo) == set()
    out = sh(repo, "dvc", "repro", "studies/dvc.yaml").stdout
    assert ran(out) == study, out  # the grid's models are reused, not retrained
    for name in ("seeds", "cost", "architectures", "procedures", "transfer"):
        md = (repo / "reports" / f"{name}.md").read_text()
        assert "NOT comparable to the paper's ImageNet numbers" in md, name
        assert (repo / "reports" / f"{name}.csv").is_file() and (repo / "reports" / f"{name}.png").is_file()
    assert "| ImageNet-val | 2 |" in (repo / "reports/seeds.md").read_text()
    assert re.search(r"\| test_vit \| [\d.]+ \(\) \| [\d.]+ \(\) \|", (repo / "reports/procedures.md").read_text())
    # T2 keeps DeiT's model EMA (a DVC-tracked folder of its own); A1 keeps none (the folder says so)
    ema = repo / "studies/procedures/ema"
    assert (ema / "test_vit-t2/model_ema.safetensors").is_file() and not (
        ema / "test_vit-a1/model_ema.safetensors"
    ).exists()
    assert json.loads((ema / "test_vit-a1/ema.json").read_text()) == {"model_ema": False}
    assert "| test_vit | t2 |" in (repo / "reports/procedures.md").read_text().split("model EMA")[-1]
    md = (repo / "reports/transfer.md").read_text()
    assert "Fine-tuning: recipes.ft" in md
    assert re.search(r"\| a1 \| [\d.]+ \(80.40\) \| [\d.]+ \| [\d.]+ \|", md), md  # the grid's own val top-1
    assert "Running stage" not in sh(repo, "dvc", "repro", "studies/dvc.yaml").stdout
    assert "Running stage" not in sh(repo, "dvc", "repro").stdout, "the default pipeline does not see the studies"
    # MLflow: the seed study is the parent of the two seed runs
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rsb").experiment_id
    parent = client.search_runs(
        [exp], "tags.`rsb.kind` = 'study' and tags.`rsb.study` = 'seeds'", order_by=["attributes.start_time DESC"]
    )[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.data.tags["rsb.seed"] for r in children) == ["1", "2"]
    assert all(r.data.tags["rsb.study"] == "seeds" and "v2/top1" in r.data.metrics for r in children)
    assert "seeds/val_std" in parent.data.metrics and parent.data.metrics["seeds/val_n"] == 2
    # one more seed and a changed outside weights file: DVC sees that seed's training and evaluation, the seed report
    # (its params) and that start, nothing else (the start's fine-tune and the transfer report follow through their
    # deps when it runs, as test_exp_run_temp_reruns_only_what_changed shows); not run here, to keep the suite in its
    # time
    set_params(repo, {"seeds.seeds": [1, 2, 3]})
    torch.manual_seed(6)
    torch.save(timm.create_model("test_resnet").state_dict(), ext)
    assert changed_stages(repo, "studies/dvc.yaml") == {
        f"studies/dvc.yaml:{s}" for s in ("seed-train@3", "seed-evaluate@3", "seeds-report", "transfer-start@theirs")
    }
    ids = {r.info.run_id for r in children}
    assert not [v for v in client.search_model_versions("name = 'rsb-test_resnet'") if v.run_id in ids], (
        "seed replicas are not registered models"
    )


def test_mlflow_run_has_training_and_evaluation(repo):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "runs/test_resnet-a1.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"train/loss", "val/top1", "real/top1", "v2/top1"} <= set(run.data.metrics)
    assert run.data.params["recipe.mixup"] == "0.2" and run.data.tags["rsb.stage"] == "train@test_resnet-a1"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "rsb" and exp.artifact_location.startswith(f"file://{repo}")
    kinds = {r.data.tags.get("rsb.kind") for r in client.search_runs([exp.experiment_id])}
    assert {"benchmark", "report"} <= kinds


# --- experiments, the queue and a remote, as users drive them ------------------------------------------------------


def commit(repo: Path, message: str) -> None:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json` as {experiment name: {rev, params, metrics by file}}."""
    out = {}
    for base in json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout):
        for exp in base.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                out[rev["name"]] = {
                    "rev": rev["rev"],
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {f: m["data"] for f, m in data["metrics"].items() if "data" in m},
                }
                # (a metrics file of a stage the experiment never ran, e.g. a study's, comes with an error instead)
    return out


def mlflow_runs(repo: Path, **tags: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return client.search_runs([client.get_experiment_by_name("rsb").experiment_id], query)


def test_exp_run_temp_reruns_only_what_changed(repo):
    out = sh(repo, "dvc", "exp", "run", "--temp", "-n", "lr6", "-S", "recipes.a3.lr=0.006").stdout
    assert ran(out) == {"train@test_resnet-a3", "evaluate@test_resnet-a3", "report"}, out
    exp = experiments(repo)["lr6"]
    assert exp["params"]["recipes"]["a3"]["lr"] == 0.006
    ev = exp["metrics"]["metrics/eval/test_resnet-a3.json"]
    (run,) = mlflow_runs(repo, **{"rsb.dvc_exp": "lr6", "rsb.stage": "train@test_resnet-a3"})
    assert run.data.metrics["v2/top1"] == pytest.approx(ev["v2/top1"])
    assert float(run.data.params["lr"]) == pytest.approx(3 * 0.006)  # scale.lr_factor 3
    assert run.info.run_name == "test_resnet-a3 @lr6"
    (report,) = mlflow_runs(repo, **{"rsb.dvc_exp": "lr6", "rsb.kind": "report"})
    assert report.data.tags["mlflow.source.git.commit"] == sh(repo, "git", "rev-parse", "HEAD").stdout.strip()


def test_the_seed_study_runs_side_by_side_through_the_queue_and_reports_from_the_run_cache(repo):
    """README's "Seeds side by side": with train.slots: 2 committed, `python -m rsb.studies.parallel -j 2` queues one
    experiment per seed and runs both at once (`dvc queue start -j 2`), each training on its own slot (its own core);
    the report's `dvc repro` then restores both trainings and evaluations from DVC's run-cache (nothing trains
    again) and reports both seeds; a later `dvc repro` of the study has nothing to do."""
    # seeds no other test of this module trains: the run-cache would restore them instead of the queue training them
    set_params(repo, {"seeds.arch": "test_resnet", "seeds.recipe": "a3", "seeds.seeds": [5, 6], "train.slots": 2})
    commit(repo, "two seeds, two slots")
    out = subprocess.run(
        [sys.executable, "-m", "rsb.studies.parallel", "-j", "2", "--poll", "5"],
        cwd=repo,
        env=clean_env(PYTHONPATH=str(repo / "src"), RSB_SLOT_DIR=str(repo.parent / "slots"), CUDA_VISIBLE_DEVICES=""),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = out.stdout + out.stderr
    assert "Running stage 'studies/dvc.yaml:seed-train@" not in report, report[-3000:]
    assert "Running stage 'studies/dvc.yaml:seeds-report'" in report, report[-3000:]
    runs = [json.loads((repo / f"studies/seeds/runs/test_resnet-a3-seed{s}.json").read_text()) for s in (5, 6)]
    assert {r["tags"]["rsb.slot"].split(" (")[0] for r in runs} == {"slot 0 of 2", "slot 1 of 2"}, runs
    assert "| ImageNet-val | 2 |" in (repo / "reports/seeds.md").read_text()
    assert "Running stage" not in sh(repo, "dvc", "repro", "studies/dvc.yaml:seeds-report").stdout


def test_queued_seed_sweep_runs_two_at_once_without_mixing(repo):
    versions, aliases = registry(repo)
    for seed in (1, 2):
        sh(
            repo,
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            f"seed{seed}",
            "-S",
            f"train.seed={seed}",
            "-S",
            "models=[test_resnet]",
            "-S",
            "run=[a3]",
        )
    # the workers `dvc queue start` leaves behind inherit its stdout/stderr: capturing them would wait for the workers
    subprocess.run(
        ["dvc", "queue", "start", "-j", "2"],
        cwd=repo,
        env=clean_env(PYTHONPATH=str(repo)),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )
    deadline = time.time() + 600
    while time.time() < deadline and re.search(r"\b(Queued|Running)\b", sh(repo, "dvc", "queue", "status").stdout):
        time.sleep(8)  # each `dvc queue status` is ~1.5 s of a core the two trainings need
    sh(repo, "dvc", "queue", "stop")  # no idle worker outlives the test
    status = sh(repo, "dvc", "queue", "status").stdout
    assert re.search(r"seed1\s.*Success", status) and re.search(r"seed2\s.*Success", status), status
    exps, seen = experiments(repo), set()
    for seed in (1, 2):
        exp = exps[f"seed{seed}"]
        assert exp["params"]["train"]["seed"] == seed
        ev = exp["metrics"]["metrics/eval/test_resnet-a3.json"]
        info = json.loads(sh(repo, "git", "show", f"{exp['rev']}:runs/test_resnet-a3.json").stdout)
        (run,) = mlflow_runs(repo, **{"rsb.dvc_exp": f"seed{seed}", "rsb.stage": "train@test_resnet-a3"})
        assert run.info.run_id == info["run_id"] and run.data.params["train.seed"] == str(seed)
        assert run.data.metrics["val/top1"] == pytest.approx(ev["val/top1"])
        assert run.data.tags["rsb.params_hash"] == info["resolved"]["digest"]
        seen.add(info["resolved"]["digest"])
    assert len(seen) == 2
    # each queued experiment registered its own model version under its own alias; the workspace's stayed put
    versions_now, aliases_now = registry(repo)
    assert len(versions_now - versions) == 2
    assert {k: v for k, v in aliases_now.items() if k in aliases} == aliases
    assert {aliases_now["a3-seed1"], aliases_now["a3-seed2"]} == versions_now - versions
    # until asked: promote moves the workspace alias to an experiment's model
    out = sh(
        repo,
        sys.executable,
        "-m",
        "rsb.tracking",
        "promote",
        "--arch",
        "test_resnet",
        "--recipe",
        "a3",
        "--exp",
        "seed2",
    ).stdout
    assert registry(repo)[1]["a3"] == aliases_now["a3-seed2"], out
    bad = sh(
        repo,
        sys.executable,
        "-m",
        "rsb.tracking",
        "promote",
        "--arch",
        "test_resnet",
        "--recipe",
        "a3",
        "--exp",
        "nope",
        check=False,
    )
    assert bad.returncode and "rsb-test_resnet@a3-nope" in bad.stderr and "Traceback" not in bad.stderr


def test_killed_dvc_repro_recovers(repo):
    """kill -9 of `dvc repro` and its stage mid-training; the next `dvc repro` needs no clean-up."""
    set_params(repo, {"recipes.a1.lr": 0.004, "recipes.a1.epochs": 750})  # only a1 reruns: 3 epochs at this scale
    # epoch 1 published: `latest` names it (its rsb.json is written just before, and a kill between the two leaves
    # nothing published, so the rerun rightly starts afresh: seen once in CI on a loaded machine)
    epoch1 = lambda: {p for p in repo.glob("checkpoints/*/*/latest") if p.read_text().strip() == "epoch1"}  # noqa: E731
    before = epoch1()
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=clean_env(PYTHONPATH=str(repo)),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not epoch1() - before:
        time.sleep(0.1)
    assert proc.poll() is None, "dvc repro ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    out = sh(repo, "dvc", "repro")
    assert "resumed checkpoints/" in out.stdout, out.stdout[-3000:]
    assert changed_stages(repo) == set()


def test_push_then_pull_into_a_fresh_clone(repo, tmp_path):
    remote = tmp_path / "remote"
    sh(repo, "dvc", "remote", "add", "-d", "local", str(remote))
    commit(repo, "remote")
    out = sh(repo, "dvc", "push").stdout
    assert "pushed" in out, out
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert sh(clone, "dvc", "pull", check=False).returncode, "plain pull fails on the studies' outputs never run"
    sh(clone, "dvc", "pull", "--allow-missing")
    for f in ("models/test_resnet-a1.safetensors", "data/prepared/info.json", "data/mini/ILSVRC2012_img_val.tar"):
        assert (clone / f).read_bytes() == (repo / f).read_bytes(), f
    assert changed_stages(clone) == set(), "a pulled clone is up to date: nothing to rerun"
