"""rsb.launch: one process runs the stage directly, more go through the real `deepspeed` launcher; bad hostfiles
and device counts are refused before anything starts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rsb.launch import LaunchError, command, read_hostfile

from conftest import clean_env, write_params


def test_one_process_runs_the_module_directly(tmp_path):
    assert command(1, 1, tmp_path / "hostfile", 0, "stages.train", ["--arch", "x"]) == [
        sys.executable, "-m", "stages.train", "--arch", "x"]


def test_several_processes_go_through_deepspeed(tmp_path):
    cmd = command(1, 4, tmp_path / "absent", 29600, "stages.train", ["--arch", "x"])
    assert cmd[0] == "deepspeed" and cmd[cmd.index("--num_gpus") + 1] == "4" and "--hostfile" not in cmd
    assert cmd[cmd.index("--master_port") + 1] == "29600" and cmd[-3:] == ["stages.train", "--arch", "x"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two nodes\nworker-1 slots=8\nworker-2 slots=8  # second\n")
    cmd = command(2, 8, hosts, 0, "stages.train", [])
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts) and cmd[cmd.index("--num_nodes") + 1] == "2"
    assert int(cmd[cmd.index("--master_port") + 1]) > 0


@pytest.mark.parametrize("text, match", [
    ("worker-1 slots=eight\n", r"hostfile:1: 'worker-1 slots=eight' is not `<host> slots=<n>`"),
    ("worker-1\n", r"hostfile:1: 'worker-1' is not"),
    ("worker-1 slots=0\n", r"n >= 1"),
    ("worker-1 slots=8\nworker-1 slots=8\n", r"hostfile:2: host worker-1 is listed twice"),
])
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
    out = subprocess.run([sys.executable, "-m", "rsb.launch", "--nodes", "2", "--devices", "1", "--hostfile",
                          str(tmp_path / "hostfile"), "stages.train"], capture_output=True, text=True, env=clean_env())
    assert out.returncode == 1 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1


@pytest.mark.slow
def test_two_processes_train_through_the_deepspeed_launcher(tmp_path, prepared):
    p = write_params(tmp_path / "params.yaml", prepared, {"train.devices": 2})
    out = subprocess.run([sys.executable, "-m", "rsb.launch", "--devices", "2", "stages.train", "--arch",
                          "test_resnet", "--recipe", "a3", "--params", str(p)], cwd=tmp_path,
                         env=clean_env(RSB_TRACKING="off"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = json.loads((tmp_path / "runs/test_resnet-a3.json").read_text())
    assert run["resolved"]["world_size"] == 2 and run["resolved"]["grad_accum"] == 1
    assert Path(tmp_path / "models/test_resnet-a3.pt").is_file()
