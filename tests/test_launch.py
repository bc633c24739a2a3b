"""rsb.launch: one process runs the stage directly, more go through the real `deepspeed` launcher; bad hostfiles
and device counts are refused before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, clean_env, write_params

from rsb.launch import LaunchError, command, read_hostfile


def test_one_process_runs_the_module_directly(tmp_path):
    assert command(1, 1, tmp_path / "hostfile", 0, "stages.train", ["--arch", "x"]) == [
        sys.executable,
        "-m",
        "stages.train",
        "--arch",
        "x",
    ]


def test_several_processes_go_through_deepspeed(tmp_path):
    cmd = command(1, 4, tmp_path / "absent", 29600, "stages.train", ["--arch", "x"])
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--num_gpus") + 1] == "4" and "--hostfile" not in cmd
    assert cmd[cmd.index("--master_port") + 1] == "29600" and cmd[-3:] == ["stages.train", "--arch", "x"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8  # second\n")
    cmd = command(2, 8, hosts, 0, "stages.train", [])
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert int(cmd[cmd.index("--master_port") + 1]) > 0


def test_without_a_console_script_the_launcher_runs_as_a_module(tmp_path, monkeypatch):
    """Wheels installed with `pip install --target` (the GPU machine) put no `deepspeed` script on PATH: the same
    runner is started as a module with this interpreter, so its workers inherit PYTHONPATH."""
    import shutil

    from rsb import launch

    monkeypatch.setattr(shutil, "which", lambda name: None)
    cmd = launch.command(1, 2, tmp_path / "absent", 29601, "stages.train", ["--arch", "x"])
    assert cmd[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"] and "--num_gpus" in cmd


def test_children_extend_pythonpath(monkeypatch):
    """A test's subprocess keeps the PYTHONPATH it was started with (carried wheels), after this checkout's."""
    from conftest import ROOT, clean_env

    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    assert clean_env()["PYTHONPATH"] == f"{ROOT / 'src'}:{ROOT}:/tmp/site"
    assert clean_env(PYTHONPATH="x")["PYTHONPATH"] == "x:/tmp/site"


@pytest.mark.parametrize(
    "text, match",
    [
        ("worker-1 slots=eight\n", r"hostfile:1: 'worker-1 slots=eight' is not `<host> slots=<n>`"),
        ("worker-1\n", r"hostfile:1: 'worker-1' is not"),
        ("worker-1 slots=0\n", r"n >= 1"),
        ("worker-1 slots=8\nworker-1 slots=8\n", r"hostfile:2: host worker-1 is listed twice"),
    ],
)
def test_a_hostfile_that_does_not_parse_is_refused(tmp_path, text, match):
    (tmp_path / "hostfile").write_text(text)
    with pytest.raises(LaunchError, match=match):
        read_hostfile(tmp_path / "hostfile")


def test_multi_node_settings_the_hostfile_cannot_serve_are_refused(tmp_path):
    with pytest.raises(LaunchError, match="train.hostfile=.*no such file"):
        command(2, 8, tmp_path / "absent", 0, "stages.train", [])
    (tmp_path / "hostfile").write_text("worker-1 slots=8\n")
    with pytest.raises(LaunchError, match="lists 1 host.*train.nodes=2"):
        command(2, 8, tmp_path / "hostfile", 0, "stages.train", [])
    (tmp_path / "hostfile").write_text("worker-1 slots=4\nworker-2 slots=8\n")
    with pytest.raises(LaunchError, match="worker-1 offer fewer slots than train.devices=8"):
        command(2, 8, tmp_path / "hostfile", 0, "stages.train", [])
    with pytest.raises(LaunchError, match="train.nodes=1, train.devices=0"):
        command(1, 0, tmp_path / "hostfile", 0, "stages.train", [])


def test_cli_reports_a_bad_hostfile_in_one_line(tmp_path):
    (tmp_path / "hostfile").write_text("worker-1 slots=x\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rsb.launch",
            "--nodes",
            "2",
            "--devices",
            "1",
            "--hostfile",
            str(tmp_path / "hostfile"),
            "stages.train",
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
    )
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


# --- multi-node without passwordless ssh: DeepSpeed's --no_ssh, and srun inside a SLURM allocation ----------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("node7", ["node7"]),
        ("a[8-10]", ["a8", "a9", "a10"]),
        ("c[001-002],d[1]", ["c001", "c002", "d1"]),
    ],
)
def test_slurm_nodelists_expand_as_scontrol_does(nodelist, hosts):
    from rsb.launch import expand_nodelist

    assert expand_nodelist(nodelist) == hosts


def test_no_ssh_takes_the_rank_from_the_environment_and_needs_a_fixed_port(tmp_path):
    hosts = tmp_path / "hostfile"
    hosts.write_text("nodeA slots=1\nnodeB slots=1\n")
    cmd = command(2, 1, hosts, 29501, "stages.train", ["--arch", "x"], "no_ssh", "auto", {"SLURM_NODEID": "1"})
    assert cmd[:1] == ["deepspeed"] and cmd[cmd.index("--node_rank") + 1] == "1" and "--no_ssh" in cmd
    assert cmd[cmd.index("--master_addr") + 1] == "nodeA" and cmd[cmd.index("--master_port") + 1] == "29501"
    cmd = command(2, 1, hosts, 29501, "stages.train", [], "no_ssh", "10.0.0.5", {"RSB_NODE_RANK": "0"})
    assert cmd[cmd.index("--master_addr") + 1] == "10.0.0.5"
    with pytest.raises(LaunchError, match="this node's rank is None; set RSB_NODE_RANK"):
        command(2, 1, hosts, 29501, "stages.train", [], "no_ssh", "auto", {})
    with pytest.raises(LaunchError, match="set train.master_port"):
        command(2, 1, hosts, 0, "stages.train", [], "no_ssh", "auto", {"RSB_NODE_RANK": "0"})


def test_slurm_runs_one_no_ssh_launcher_per_node_through_srun(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"}
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the nodelist is expanded here
    cmd = command(2, 8, tmp_path / "hostfile", 0, "stages.train", ["--arch", "x"], "slurm", "auto", env)
    assert cmd[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    tail = cmd[cmd.index("rsb.launch") + 1 :]
    assert tail[tail.index("--launcher") + 1] == "no_ssh" and tail[tail.index("--master-addr") + 1] == "gpu01"
    assert int(tail[tail.index("--master-port") + 1]) > 0
    assert (tmp_path / "hostfile.slurm-77").read_text() == "gpu01 slots=8\ngpu02 slots=8\n"
    with pytest.raises(LaunchError, match="the allocation has 2 node"):
        command(3, 8, tmp_path / "hostfile", 0, "stages.train", [], "slurm", "auto", env)
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not set"):
        command(2, 8, tmp_path / "hostfile", 0, "stages.train", [], "slurm", "auto", {})


@pytest.mark.slow  # 29 s; the fast suite keeps the 2-process launcher parity; CI runs this
def test_two_nodes_without_ssh_equal_one_process_accumulating(tmp_path, prepared, extracted, monkeypatch, world):
    """Two `--no_ssh` launchers on 127.0.0.1 (node rank 0 and 1, one CPU process each) train two epochs as a world
    of 2 across "2 nodes": the same lr, gradients and weights as train.py on 2 processes, and the same weights as
    one process accumulating 2 micro-batches."""
    from test_train import PARITY, assert_same_run, off, our_run_in_process, params_file, read_outputs, reference_run

    from rsb.net import free_port

    nodes = tmp_path / "nodes"
    nodes.mkdir()
    port = free_port()
    cfg = {
        **PARITY,
        "train.nodes": 2,
        "train.devices": 1,
        "train.micro_batch": 8,
        "train.launcher": "no_ssh",
        "train.master_port": port,
        "train.master_addr": "127.0.0.1",
    }
    p = params_file(nodes, prepared, cfg)
    (nodes / "hostfile").write_text("nodeA slots=1\nnodeB slots=1\n")
    cmd = [
        sys.executable,
        "-m",
        "rsb.launch",
        "--nodes",
        "2",
        "--devices",
        "1",
        "--hostfile",
        "hostfile",
        "--master-port",
        str(port),
        "--launcher",
        "no_ssh",
        "--master-addr",
        "127.0.0.1",
        "parity_worker",
        "--arch",
        "test_resnet",
        "--recipe",
        "a1",
        "--params",
        str(p),
    ]
    env = clean_env(
        RSB_TRACKING="off",
        GRADS_OUT=str(nodes / "grads"),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=f"{ROOT / 'src'}:{ROOT}:{ROOT / 'tests'}",
    )
    procs = [
        subprocess.Popen(
            cmd,
            cwd=nodes,
            env={**env, "RSB_NODE_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    run = json.loads((nodes / "runs/test_resnet-a1.json").read_text())
    assert run["resolved"]["world_size"] == 2 and run["resolved"]["grad_accum"] == 1
    grads = [torch.load(nodes / "grads" / f"grads-rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(a, b) for x, y in zip(*grads) for a, b in zip(x, y))
    two_nodes = read_outputs(nodes, grads[0])
    assert_same_run(two_nodes, reference_run(p, extracted, 2, 1, cfg))

    one = tmp_path / "one"
    one.mkdir()
    q = params_file(one, prepared, {**PARITY, "train.micro_batch": 8})  # one process, 2 micro-batches
    single = our_run_in_process(one, q, monkeypatch)
    for k, v in single["state"].items():
        if v.is_floating_point():
            assert off(two_nodes["state"][k], v) <= 1e-3, k


FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for SLURM's srun on a machine without SLURM: runs the command once per node of the allocation
# (--nodes=N, one task per node) with SLURM_NODEID set, as srun does, and exits with the tasks' highest status.
# Its options go to srun.log beside it.
echo "$@" > "$(dirname "$0")/srun.log"
n=1; while [[ "$1" == --* ]]; do [[ "$1" == --nodes=* ]] && n="${1#--nodes=}"; shift; done
pids=(); for ((i=0; i<n; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p"; s=$?; (( s > rc )) && rc=$s; done; exit $rc
"""


@pytest.mark.slow
def test_slurm_launcher_trains_across_two_nodes_through_srun(tmp_path, prepared):
    """train.launcher: slurm end to end, with `srun` replaced by a script that starts the command per node as srun
    does: rsb.launch -> srun -> one rsb.launch (no_ssh) per node -> deepspeed --no_ssh -> a world of 2."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    p = write_params(
        tmp_path / "params.yaml",
        prepared,
        {"train.nodes": 2, "train.launcher": "slurm", "train.master_addr": "127.0.0.1"},
    )
    env = clean_env(
        RSB_TRACKING="off", SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_JOB_ID="5", PATH=f"{bin_dir}:{os.environ['PATH']}"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rsb.launch",
            "--nodes",
            "2",
            "--devices",
            "1",
            "--launcher",
            "slurm",
            "--master-addr",
            "127.0.0.1",
            "stages.train",
            "--arch",
            "test_resnet",
            "--recipe",
            "a3",
            "--params",
            str(p),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = json.loads((tmp_path / "runs/test_resnet-a3.json").read_text())
    assert run["resolved"]["world_size"] == 2
    assert (tmp_path / "hostfile.slurm-5").read_text() == "nodeA slots=1\nnodeB slots=1\n"


def test_a_claimed_gpu_slot_is_handed_to_deepspeed_as_its_visible_devices(tmp_path):
    """With a slot's GPUs in CUDA_VISIBLE_DEVICES, DeepSpeed's runner must be given no GPU count (it then takes
    CUDA_VISIBLE_DEVICES as its --include; a count would make it ignore them and start on GPUs 0..n-1)."""
    cmd = command(1, 2, tmp_path / "hostfile", 0, "stages.train", ["--arch", "x"], visible=True)
    assert "--num_gpus" not in cmd and "--num_nodes" not in cmd and "--include" not in cmd
    assert cmd[cmd.index("--module") :] == ["--module", "stages.train", "--arch", "x"]
    whole = command(1, 2, tmp_path / "hostfile", 0, "stages.train", ["--arch", "x"])
    assert whole[whole.index("--num_gpus") + 1] == "2"
