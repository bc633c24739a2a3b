"""The fault matrix and the bad-input table of RELIABILITY.md: each row's test.

Faults are real: `kill -9` of the stage process at a chosen point (tests/fault_worker.py picks the moment), then the
same command again, as `dvc repro` would run it. On the CPU the result must be bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, clean_env, write_params

from rsb import checkpoint
from rsb.config import ConfigError, load_params
from rsb.data.datasets import PreparedError, Split
from rsb.io import load_weights

FAULTS = ROOT / "tests" / "fault_worker.py"
NAME = "test_resnet-a1"
OVER = {"scale.min_epochs": 3, "train.workers": 1}


def train_args(params: Path) -> list[str]:
    return ["stages.train", "--arch", "test_resnet", "--recipe", "a1", "--params", str(params)]


def run(cwd: Path, *cmd: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *cmd],
        cwd=cwd,
        env=clean_env(RSB_TRACKING="off"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def killed_then_rerun(tmp: Path, prepared: Path, point: str, over: dict = OVER) -> subprocess.CompletedProcess:
    tmp.mkdir()
    p = write_params(tmp / "params.yaml", prepared, over)
    out = run(tmp, str(FAULTS), point, *train_args(p))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    assert not (tmp / "models" / f"{NAME}.safetensors").exists(), "a killed stage must not look finished"
    again = run(tmp, "-m", *train_args(p))
    assert again.returncode == 0, again.stderr[-3000:]
    return again


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prepared) -> Path:
    d = tmp_path_factory.mktemp("straight")
    out = run(d, "-m", *train_args(write_params(d / "params.yaml", prepared, OVER)))
    assert out.returncode == 0, out.stderr[-3000:]
    return d


def assert_same_result(a: Path, b: Path) -> None:
    wa, wb = load_weights(a / "models" / f"{NAME}.safetensors"), load_weights(b / "models" / f"{NAME}.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    ma, mb = (json.loads((d / "metrics/train" / f"{NAME}.json").read_text()) for d in (a, b))
    assert ma["train/loss"] == mb["train/loss"] and ma["val/top1"] == mb["val/top1"]


# --- faults: kill -9, then the same command ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("point, resumed_at", [("mid-epoch", 1), ("checkpoint-write", 1), ("between-epochs", 1)])
def test_killed_training_resumes_to_identical_weights(tmp_path, prepared, straight, point, resumed_at):
    again = killed_then_rerun(tmp_path / point, prepared, point)
    assert f"at epoch {resumed_at}/3" in again.stdout
    assert_same_result(straight, tmp_path / point)
    (ckpts,) = (tmp_path / point / "checkpoints" / NAME).iterdir()
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch3", "latest"], "partial epoch folders are cleaned up"


@pytest.mark.slow
def test_killed_training_resumes_from_its_checkpoint_inside_the_epoch(tmp_path, prepared, straight):
    """train.checkpoint_every = 2 updates, keep 2: `kill -9` at update 13 (the 3rd of epoch 2) loses one update,
    not the epoch: the rerun resumes from `epoch1.2` (update 12) and ends bit-identical to an uninterrupted run,
    with the newest two checkpoints left."""
    tmp = tmp_path / "every2"
    again = killed_then_rerun(
        tmp, prepared, "mid-epoch", {**OVER, "train.checkpoint_every": 2, "train.keep_checkpoints": 2}
    )
    assert "at epoch 1/3 + 2 updates" in again.stdout, again.stdout[-2000:]
    assert_same_result(straight, tmp)
    (ckpts,) = (tmp / "checkpoints" / NAME).iterdir()
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch2.8", "epoch3", "latest"]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["full-disk-checkpoint", "full-disk-weights"])
def test_a_write_the_disk_refuses_keeps_what_was_published_and_says_so(tmp_path, prepared, straight, point):
    """A real refusal by the kernel (a file-size limit set just before the write, EFBIG, as ENOSPC or EDQUOT on a
    full disk or quota): epoch 2's checkpoint, or the final weights. One line naming the folder or file and the
    bytes it needs, exit 1, no traceback; its own partial files removed; the last published checkpoint kept,
    verified and resumed by the same command, which ends bit-identical to an uninterrupted run."""
    tmp = tmp_path / point
    tmp.mkdir()
    p = write_params(tmp / "params.yaml", prepared, OVER)
    out = run(tmp, str(FAULTS), point, *train_args(p))
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    (ckpts,) = (tmp / "checkpoints" / NAME).iterdir()
    if point == "full-disk-checkpoint":
        where = ckpts.relative_to(tmp)  # as the stage names it, from where it runs
        assert f"{where}: the checkpoint epoch2 could not be written (" in line and "epoch1 is kept" in line, line
        assert sorted(p.name for p in ckpts.iterdir()) == ["epoch1", "latest"], "the partial epoch2 is removed"
        assert checkpoint.latest_tag(ckpts) == "epoch1"
        checkpoint.verify(ckpts / "epoch1")
    else:
        weights = Path("models") / f"{NAME}.safetensors"
        assert f"{weights}: the weights file could not be written" in line, line
        assert not list((tmp / "models").iterdir()), "no weights and no partial file"
        assert checkpoint.latest_tag(ckpts) == "epoch3"
    assert re.search(r"it needs about \d+\.\d MB", line), line
    again = run(tmp, "-m", *train_args(p))
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr[-3000:]
    assert_same_result(straight, tmp)


@pytest.mark.slow
def test_killed_evaluation_reruns_cleanly(tmp_path, prepared, straight):
    args = ["stages.evaluate", "--arch", "test_resnet", "--recipe", "a1", "--params", str(straight / "params.yaml")]
    first = run(straight, "-m", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    clean = (straight / "metrics/eval" / f"{NAME}.json").read_text()
    (straight / "metrics/eval" / f"{NAME}.json").unlink()
    assert run(straight, str(FAULTS), "evaluation", *args).returncode == -signal.SIGKILL
    assert not list((straight / "metrics").glob("eval/*")), "nothing half-written that looks complete"
    assert run(straight, "-m", *args).returncode == 0
    drop = ("eval_s",)
    a, b = (json.loads(t) for t in (clean, (straight / "metrics/eval" / f"{NAME}.json").read_text()))
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


@pytest.mark.slow
def test_a_stage_stuck_outside_its_loader_writes_its_stacks_and_one_line(tmp_path, straight):
    """The evaluate stage's main process hangs after its first batch (asleep, no loader involved). With
    train.stall_s = 3 its watchdog (rsb.watchdog.stage) writes every thread's stack and one line naming the stage
    and the batch, and exits 75, in seconds; no metrics file is left."""
    from rsb.watchdog import EXIT_STALLED

    p = write_params(
        tmp_path / "params.yaml",
        Path(load_params(straight / "params.yaml").data.prepared),
        {**OVER, "train.stall_s": 3},
    )
    args = ["stages.evaluate", "--arch", "test_resnet", "--recipe", "a1", "--params", str(p)]
    t0 = time.time()
    out = run(straight, str(FAULTS), "evaluate-hang", *args, timeout=120)
    assert out.returncode == EXIT_STALLED and time.time() - t0 < 60, (out.returncode, out.stderr[-3000:])
    assert "Thread 0x" in out.stderr and "fault_worker.py" in out.stderr, "every thread's stack, the main one asleep"
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith(f"error: evaluate@{NAME}: no progress for ") and "(train.stall_s = 3) after batch 0;" in line


@pytest.mark.slow
def test_killed_prepare_leaves_no_partial_folder_and_reruns(release, prepared, tmp_path):
    out = tmp_path / "data" / "prepared"
    p = write_params(tmp_path / "params.yaml", prepared)
    args = ["stages.prepare", "--params", str(p), "--raw", str(release[0]), "--out", str(out), "--source", "mini"]
    killed = run(tmp_path, str(FAULTS), "prepare-index", *args)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list((tmp_path / "data").glob(".prepared.partial-*/v2.tar")) and not out.exists(), "killed mid-prepare"
    assert run(tmp_path, "-m", *args).returncode == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared"], "the abandoned partial is removed"
    assert (
        json.loads((out / "info.json").read_text())["digest"]
        == json.loads((prepared / "info.json").read_text())["digest"]
    )


def launch_fault(
    cwd: Path, point: str, params: Path, timeout: int, devices: int = 2, env: dict | None = None, *launcher: str
) -> subprocess.CompletedProcess:
    """The training on `devices` processes through the real launcher, each rank running tests/fault_worker.py's
    `point`; in a session of its own, so that a fault can signal the launcher (the session leader)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "rsb.launch",
            "--devices",
            str(devices),
            *launcher,
            "fault_worker",
            point,
            *train_args(params),
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
        env=clean_env(RSB_TRACKING="off", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}:{ROOT / 'tests'}", **(env or {})),
    )


@pytest.mark.slow
def test_a_crashed_rank_stops_the_run_and_is_named(tmp_path, prepared):
    p = write_params(tmp_path / "params.yaml", prepared, {"train.devices": 2})
    t0 = time.time()
    out = launch_fault(tmp_path, "rank1-crash", p, timeout=600)
    assert out.returncode != 0
    assert time.time() - t0 < 300, "the surviving rank must not wait for the dead one"
    assert "error: rank 1 of 2 failed: RuntimeError: injected fault on this rank" in out.stdout + out.stderr
    assert not (tmp_path / "models" / f"{NAME}.safetensors").exists()


@pytest.mark.slow
def test_a_stopped_rank_is_found_by_its_peer_which_writes_its_stacks_and_one_line(tmp_path, prepared):
    """Rank 1 stops itself (SIGSTOP: alive, holding its place in the collective, never continuing). Rank 0, waiting
    in the all-reduce, makes no progress for train.stall_s = 5 s: its watchdog writes every thread's stack and one
    line naming the rank and the last update, and exits EXIT_STALLED; the launcher stops the rest, in seconds, not
    the process group's 30 minutes. The last checkpoint is what a rerun resumes (tested above for kills)."""
    from rsb.watchdog import EXIT_STALLED

    p = write_params(tmp_path / "params.yaml", prepared, {"train.devices": 2, "train.stall_s": 5})
    t0 = time.time()
    out = launch_fault(tmp_path, "rank1-stop", p, timeout=300)
    both = out.stdout + out.stderr
    assert out.returncode != 0 and time.time() - t0 < 120, (out.returncode, both[-3000:])
    assert "Thread 0x" in both and "rsb/engine.py" in both, "every thread's stack, the main one inside the step"
    lines = [ln for ln in both.splitlines() if ln.startswith("error: rank 0 of 2: no progress for ")]
    assert len(lines) == 1 and "(train.stall_s = 5) after update 1;" in lines[0], both[-3000:]
    assert f"exits with return code = {EXIT_STALLED}" in both or "Traceback" not in out.stderr
    assert not (tmp_path / "models" / f"{NAME}.safetensors").exists()


# --- inside an epoch: checkpoints on a schedule, stop signals, requeue ------------------------------------------------


def train_here(d: Path, prepared: Path, over: dict, monkeypatch) -> dict:
    """stages.train in this process (a world of one): the final weights and the per-update and per-epoch logs."""
    from stages.train import main

    d.mkdir(exist_ok=True)
    monkeypatch.chdir(d)
    monkeypatch.setenv("RSB_TRACKING", "off")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(write_params(d / "params.yaml", prepared, over))])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before, "handlers given back"
    return outputs(d)


def outputs(d: Path) -> dict:
    return {
        "weights": load_weights(d / "models" / f"{NAME}.safetensors"),
        "updates": (d / "plots/train" / f"{NAME}.updates.csv").read_text(),
        "loss": json.loads((d / "metrics/train" / f"{NAME}.json").read_text())["train/loss"],
        "epochs": [ln.split(",")[:3] for ln in (d / "plots/train" / f"{NAME}.csv").read_text().splitlines()],
    }


def assert_same_outputs(a: dict, b: dict) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]), "weights differ"
    assert a["updates"] == b["updates"], "the per-update losses and lrs differ"
    assert a["loss"] == b["loss"] and a["epochs"] == b["epochs"], "the epochs' losses differ"


def test_a_checkpoint_inside_an_epoch_resumes_bit_identically(tmp_path, prepared, monkeypatch, world):
    """train.checkpoint_every = 3 updates (10 updates an epoch, accumulation 2, A1: Mixup/CutMix, drop path,
    repeated augmentation): saving inside epochs changes nothing, and a run resumed from a checkpoint inside epoch 1
    (update 3) or epoch 2 (update 2, 12 in all) continues to the same weights, the same loss and lr at every update,
    across the epoch boundaries after it. The resume must restore the sampler's position, each slot's Python, NumPy
    and torch streams and BatchNorm statistics, the scheduler and the epoch's rows."""
    plain = train_here(tmp_path / "plain", prepared, OVER, monkeypatch)
    saving = train_here(
        tmp_path / "saving", prepared, {**OVER, "train.checkpoint_every": 3, "train.keep_checkpoints": 100}, monkeypatch
    )
    assert_same_outputs(plain, saving)
    (ckpts,) = (tmp_path / "saving" / "checkpoints" / NAME).iterdir()
    tags = sorted((p.name for p in ckpts.iterdir() if p.name != "latest"), key=checkpoint.order)
    assert tags[:5] == ["epoch0.3", "epoch0.6", "epoch0.9", "epoch1", "epoch1.2"], tags
    for tag in ("epoch0.3", "epoch1.2"):
        d = tmp_path / tag
        target = d / "checkpoints" / NAME / ckpts.name
        target.mkdir(parents=True)
        shutil.copytree(ckpts / tag, target / tag)
        (target / "latest").write_text(tag)
        resumed = train_here(d, prepared, OVER, monkeypatch)
        assert_same_outputs(plain, resumed)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_saves_at_the_next_update_and_the_rerun_is_identical(tmp_path, prepared, monkeypatch, world, sig):
    """The signal arrives inside update 2 (at its 3rd micro-batch: accumulation 2), and again while the checkpoint's
    files are written: the stage finishes update 2, saves `epoch0.2` whole, and stops with errors.Stopped (exit 76
    through errors.run) naming the signal, the update and the checkpoint; the same command resumes there and ends
    as the uninterrupted run, bit for bit."""
    import os

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from rsb import engine, errors

    plain = train_here(tmp_path / "plain", prepared, OVER, monkeypatch)
    calls = {"n": 0}
    forward_backward, write = engine.forward_backward, TorchCheckpointEngine.save

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), getattr(signal, sig))
        return forward_backward(*args, **kwargs)

    def signalled_write(self, state_dict, path):
        os.kill(os.getpid(), getattr(signal, sig))  # a second signal in the middle of the save
        write(self, state_dict, path)

    monkeypatch.setattr(engine, "forward_backward", signalled)
    monkeypatch.setattr(TorchCheckpointEngine, "save", signalled_write)
    d = tmp_path / "stopped"
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with pytest.raises(errors.Stopped) as stopped:
        train_here(d, prepared, OVER, monkeypatch)
    (ckpts,) = (d / "checkpoints" / NAME).iterdir()
    assert f"rank 0 of 1: {sig} at update 2: the checkpoint checkpoints/{NAME}/{ckpts.name}/epoch0.2 is saved" in str(
        stopped.value
    )
    assert checkpoint.latest_tag(ckpts) == "epoch0.2" and not (d / "models").exists()
    checkpoint.verify(ckpts / "epoch0.2")
    assert signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN, "ignored after"
    signal.signal(signal.SIGTERM, before[0])
    signal.signal(signal.SIGUSR1, before[1])
    monkeypatch.undo()
    assert_same_outputs(plain, train_here(d, prepared, OVER, monkeypatch))


def stop_lines(out: subprocess.CompletedProcess) -> list[str]:
    """Every `stopped:` line (a rank's may follow another rank's progress bar on the same terminal line)."""
    return re.findall(r"stopped: [^\r\n]*", out.stdout + out.stderr)


@pytest.mark.slow
def test_sigterm_twice_to_a_training_process_saves_stops_and_resumes(tmp_path, prepared, straight):
    """One process through rsb.launch (it is the rank): SIGTERM inside update 2, again during the save; exit 76,
    one `stopped:` line, `epoch0.2` published; the same command resumes there and equals the uninterrupted run."""
    from rsb.errors import EXIT_STOPPED

    p = write_params(tmp_path / "params.yaml", prepared, OVER)
    out = launch_fault(tmp_path, "term-twice", p, timeout=300, devices=1)
    assert out.returncode == EXIT_STOPPED and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = stop_lines(out)
    assert "rank 0 of 1: SIGTERM at update 2: the checkpoint " in line and line.endswith("requeues the job)"), line
    again = run(tmp_path, "-m", "rsb.launch", *train_args(p))
    assert again.returncode == 0 and "at epoch 0/3 + 2 updates" in again.stdout, again.stderr[-3000:]
    assert_same_result(straight, tmp_path)


@pytest.fixture(scope="module")
def straight2(tmp_path_factory, prepared) -> Path:
    """The uninterrupted run on 2 processes through the launcher."""
    d = tmp_path_factory.mktemp("straight2")
    p = write_params(d / "params.yaml", prepared, {**OVER, "train.devices": 2})
    out = run(d, "-m", "rsb.launch", "--devices", "2", *train_args(p), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return d


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_update(tmp_path, prepared, straight2):
    """Two processes; SIGUSR1 reaches rank 1 alone (inside update 3: each rank's 3rd micro-batch). The ranks agree
    after update 3: both save `epoch0.3` (rank 0 learning it from the agreement), both stop with 76, and the same
    command resumes and equals the uninterrupted 2-process run bit for bit."""
    from rsb.errors import EXIT_STOPPED

    p = write_params(tmp_path / "params.yaml", prepared, {**OVER, "train.devices": 2})
    out = launch_fault(tmp_path, "usr1-rank1", p, timeout=600)
    assert out.returncode == EXIT_STOPPED, (out.stdout + out.stderr)[-3000:]
    lines = stop_lines(out)
    assert any("rank 1 of 2: SIGUSR1 at update 3" in ln for ln in lines), lines
    assert any("rank 0 of 2: a peer's stop signal at update 3" in ln for ln in lines), lines
    (ckpts,) = (tmp_path / "checkpoints" / NAME).iterdir()
    assert checkpoint.latest_tag(ckpts) == "epoch0.3"
    again = run(tmp_path, "-m", "rsb.launch", "--devices", "2", *train_args(p), timeout=600)
    assert again.returncode == 0 and "at epoch 0/3 + 3 updates" in again.stdout, again.stderr[-3000:]
    assert_same_result(straight2, tmp_path)


# Stands in for SLURM's scontrol: expands a plain host list, and records any other request in scontrol.log
FAKE_SCONTROL = """#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo "$3" | tr , '\\n'; exit 0; fi
echo "$@" >> "$(dirname "$0")/scontrol.log"
"""


@pytest.mark.slow
def test_the_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_resumes(tmp_path, prepared, straight2):
    """train.launcher slurm, 1 node x 2 processes: rsb.launch -> srun (a stand-in that runs its command as srun does;
    it records its options) -> rsb.launch per node -> deepspeed -> 2 ranks. SIGUSR1 goes to every process of the
    step, as SLURM's `--signal=USR1@N` delivers it N s before the time limit: the ranks save and stop, the launcher
    runs `scontrol requeue <job>` (a stand-in that records it) and exits 76. The requeued job (the same command)
    resumes and equals the uninterrupted 2-process run."""
    from test_launch import FAKE_SRUN

    from rsb.errors import EXIT_STOPPED

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    over = {**OVER, "train.devices": 2, "train.launcher": "slurm", "train.slurm_signal_s": 240}
    p = write_params(tmp_path / "params.yaml", prepared, over)
    env = {"SLURM_JOB_NODELIST": "nodeA", "SLURM_JOB_ID": "42", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    slurm = ("--launcher", "slurm", "--master-addr", "127.0.0.1", "--slurm-signal-s", "240")
    out = launch_fault(tmp_path, "usr1-step", p, 600, 2, env, *slurm)
    assert out.returncode == EXIT_STOPPED, (out.stdout + out.stderr)[-3000:]
    assert (
        (bin_dir / "srun.log")
        .read_text()
        .startswith("--nodes=1 --ntasks-per-node=1 --kill-on-bad-exit=1 --signal=USR1@240 ")
    )
    assert (bin_dir / "scontrol.log").read_text() == "requeue 42\n"
    assert "stopped: the training saved and stopped before the time limit; job 42 is requeued" in out.stderr
    (ckpts,) = (tmp_path / "checkpoints" / NAME).iterdir()
    assert checkpoint.order(checkpoint.latest_tag(ckpts) or "") == (0, 3)
    again = launch_fault(tmp_path, "none", p, 600, 2, env, *slurm)
    assert again.returncode == 0 and "at epoch 0/3 + 3 updates" in again.stdout, again.stderr[-3000:]
    assert_same_result(straight2, tmp_path)


# --- security: checkpoints are verified before DeepSpeed's full unpickler runs, on the resume path -----------------


# --- bad input: one clear error naming the key or file, before expensive work ----------------------------------------


@pytest.mark.parametrize(
    "override, message",
    [
        ({"run": ["a1", "a4"]}, "run lists recipe 'a4', which is not under recipes"),
        ({"recipes.a1.mixpu": 0.2}, "unknown key recipes.a1.mixpu"),
        ({"scale.batchsize": 64}, "unknown key scale.batchsize"),
        ({"recipes.a1.epochs": 0}, "recipes.a1.epochs = 0: must be an integer >= 1"),
        ({"recipes.a2.epochs": -5}, "recipes.a2.epochs = -5: must be an integer >= 1"),
        ({"scale.epochs": 0.0}, "scale.epochs = 0.0: must be a finite number > 0"),
        ({"recipes.a1.lr": "fast"}, "recipes.a1.lr = 'fast': must be a float"),
        ({"models": []}, "models = []: must be a non-empty list"),
        ({"train.zero_stage": 3}, "zero_stage"),
    ],
)
def test_bad_params_name_the_key(tmp_path, prepared, override, message):
    p = write_params(tmp_path / "params.yaml", prepared, override)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_params(p)


@pytest.mark.parametrize(
    "override, arch, message",
    [
        ({}, "resnet5", "architecture 'resnet5' is not under models"),
        ({"models": ["resnet5"]}, "resnet5", "models: 'resnet5' is not a timm architecture"),
        (
            {"scale.batch_size": 24, "train.micro_batch": 16},
            "test_resnet",
            "scale.batch_size=24 is not micro_batch x devices x accumulation",
        ),
        ({"train.micro_batch": 5, "scale.batch_size": 15}, "test_resnet", "Mixup/CutMix need an even batch"),
    ],
)
def test_bad_training_setups_fail_before_any_work(tmp_path, prepared, override, arch, message):
    from stages.train import main

    p = write_params(tmp_path / "params.yaml", prepared, override)
    with pytest.raises(ConfigError, match=message):
        main(["--arch", arch, "--recipe", "a1", "--params", str(p)])
    assert not (tmp_path / "checkpoints").exists()


def test_params_file_that_is_not_yaml_or_missing(tmp_path):
    (tmp_path / "params.yaml").write_text("recipes: [unclosed\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="nope.yaml: not found"):
        load_params(tmp_path / "nope.yaml")


def test_training_before_prepare_names_the_stage(tmp_path, prepared):
    from stages.train import main

    p = write_params(tmp_path / "params.yaml", prepared, {"data.prepared": str(tmp_path / "absent")})
    with pytest.raises(PreparedError, match="run `dvc repro prepare` first"):
        main(["--arch", "test_resnet", "--recipe", "a1", "--params", str(p)])


@pytest.mark.parametrize("edit", ["append", "truncate", "same-size", "remove"])
def test_an_archive_changed_after_preparation_is_refused(release_copy, tmp_path, edit):
    """The datasets read the archives in place: one that changed after prepare indexed it is refused at start
    (size and both ends' hash: one stat and 128 KiB per archive), naming it and the stage to rerun."""
    from rsb.data.index import ARCHIVES
    from rsb.data.prepare import build

    out = tmp_path / "prepared"
    build(release_copy, out, "mini", False)
    val = release_copy / ARCHIVES["val"]
    data = val.read_bytes()
    if edit == "append":
        val.write_bytes(data + b"\0" * 512)
    elif edit == "truncate":
        val.write_bytes(data[:-1024])
    elif edit == "same-size":  # one byte of an image in the last 64 KiB (the tail is zero padding)
        at = len(data) - 30_000
        val.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :])
    else:
        val.unlink()
    with pytest.raises(
        PreparedError,
        match=r"ILSVRC2012_img_val.tar: changed since `prepare` indexed it.*"
        r"dvc repro prepare",
    ):
        Split(out, "val")
    Split(out, "train")  # the untouched archive still loads


def test_cli_errors_are_one_line_without_traceback(tmp_path, prepared):
    p = write_params(tmp_path / "params.yaml", prepared, {"recipes.a1.mixpu": 0.2})
    out = run(tmp_path, "-m", *train_args(p))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and "recipes.a1.mixpu" in out.stderr


def _epoch_dir(d: Path) -> Path:
    (run_dir,) = (d / "checkpoints" / NAME).iterdir()
    return run_dir / checkpoint.latest_tag(run_dir)


class _Stuck(torch.utils.data.Dataset):
    """A worker that never delivers (as one whose feeder thread died: /dev/shm full, a socket it cannot bind)."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        time.sleep(3600)


@pytest.mark.timeout(120)  # without the loader's timeout this waits forever: pytest-timeout fails it instead
def test_a_loader_that_delivers_nothing_fails_in_one_line(monkeypatch):
    """Every loader of the project (rsb.loader.worker_loader, training's and evaluation's) gives up after
    STALL_S; rsb.errors turns torch's timeout into the one line that says what to check."""
    from rsb import errors
    from rsb import loader as loaders

    monkeypatch.setattr(loaders, "STALL_S", 2)
    with pytest.raises(SystemExit) as e:
        errors.run(lambda: next(iter(loaders.eval_loader(_Stuck(), 2, workers=1))), "rank 0 of 1")
    assert str(e.value.code).startswith("error: train.workers: the loader workers delivered no batch in 2 s"), e.value


@pytest.mark.slow
def test_checkpoint_files_are_plain_zip_tensors(straight):
    """What verify() accepts is what DeepSpeed writes here: torch zip files that weights_only can read."""
    for f in _epoch_dir(straight).glob("*.pt"):
        assert zipfile.is_zipfile(f)
        torch.load(f, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_a_killed_zero_run_resumes_to_identical_weights(tmp_path, prepared):
    """T2 with ZeRO 1 (its optimizer state is DeepSpeed's zero_pp_rank_* file, which pickles DeepSpeed's loss scaler,
    ZeRO stage enum and fragment addresses): kill -9 between epochs, rerun, resume, bit-identical to a straight run.
    The checkpoint is still verified with the weights-only unpickler, those three data classes allowed."""
    over = {**OVER, "train.zero_stage": 1, "train.channels_last": False, "recipes.t2.model_ema": False}  # the grid's
    args = ["stages.train", "--arch", "test_resnet", "--recipe", "t2"]
    weights = {}
    for case in ("killed", "straight"):
        d = tmp_path / case
        d.mkdir()
        p = write_params(d / "params.yaml", prepared, over)
        if case == "killed":
            assert run(d, str(FAULTS), "between-epochs", *args, "--params", str(p)).returncode == -signal.SIGKILL
            assert list((d / "checkpoints").rglob("zero_pp_rank_0_*optim_states.pt")), "ZeRO wrote its own states"
        out = run(d, "-m", *args, "--params", str(p))
        assert out.returncode == 0, out.stderr[-3000:]
        assert ("resumed checkpoints/" in out.stdout) == (case == "killed"), out.stdout[-2000:]
        weights[case] = load_weights(d / "models" / "test_resnet-t2.safetensors")
    assert all(torch.equal(weights["killed"][k], weights["straight"][k]) for k in weights["straight"])
