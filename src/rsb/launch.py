"""Start a stage on 1..N processes and 1..N nodes: what dvc.yaml's train command runs.

    python -m rsb.launch --nodes 1 --devices 1 --hostfile hostfile --master-port 0 --launcher pdsh \
                         stages.train --arch X --recipe Y

One process on one node runs the module directly: the DeepSpeed launcher would spawn that same single process, but
through two extra Python interpreters that each import torch and deepspeed (~15 s a stage on a 2-core CPU; see
BENCHMARKS.md). More go through `deepspeed`, the launcher DeepSpeed documents, in one of three ways (train.launcher):

  pdsh    DeepSpeed's default: this node starts every node's processes over passwordless ssh (hostfile).
  no_ssh  DeepSpeed's `--no_ssh`: each node runs this same command itself, with its rank in RSB_NODE_RANK (or
          SLURM_NODEID); rank 0's address is train.master_addr, else MASTER_ADDR, else the hostfile's first host.
  slurm   inside a SLURM allocation (`sbatch`): `srun` starts one `no_ssh` launcher per node, so `dvc repro` runs
          once, on the first node, and no ssh is needed; the hostfile is built from SLURM_JOB_NODELIST.

Either way every worker trains with the DeepSpeed engine. Before anything starts, the options go through their
params.yaml keys' domains (rsb.config, ~0.1 s to import), and a fixed rendezvous port this node would open must be
free. This module imports only the standard library itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from rsb.errors import RsbError
from rsb.net import check_port, free_port

LAUNCHERS = ("pdsh", "no_ssh", "slurm")


class LaunchError(RsbError, ValueError):
    """A launch that cannot work: says which setting or file, and what to do."""


def read_hostfile(path: Path) -> dict[str, int]:
    """DeepSpeed's hostfile format: `<host> slots=<n>` per line, `#` comments. One clear error for anything else."""
    if not path.is_file():
        raise LaunchError(
            f"train.hostfile={path}: no such file; a multi-node run needs one line `<host> slots=<n>` "
            "per node (DeepSpeed's hostfile format)"
        )
    hosts = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise LaunchError(
                f"{path}:{n}: {line!r} is not `<host> slots=<n>` with n >= 1 (DeepSpeed's hostfile "
                "format); fix that line"
            )
        if m.group(1) in hosts:
            raise LaunchError(f"{path}:{n}: host {m.group(1)} is listed twice; list each node once")
        hosts[m.group(1)] = int(m.group(2))
    return hosts


def check_hosts(hostfile: Path, nodes: int, devices: int) -> list[str]:
    hosts = read_hostfile(hostfile)
    if len(hosts) < nodes:
        raise LaunchError(
            f"{hostfile}: lists {len(hosts)} host(s) but train.nodes={nodes}; add hosts or lower train.nodes"
        )
    if short := [h for h, s in list(hosts.items())[:nodes] if s < devices]:
        raise LaunchError(f"{hostfile}: {', '.join(short)} offer fewer slots than train.devices={devices}")
    return list(hosts)[:nodes]


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list (`gpu[01-03,07],login1`) as `scontrol show hostnames` prints it."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts


def slurm_hosts(env) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError(
            "train.launcher=slurm: SLURM_JOB_NODELIST is not set; run `dvc repro` inside an allocation "
            "(sbatch or salloc), or use train.launcher: no_ssh / pdsh"
        )
    if shutil.which("scontrol"):
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    return expand_nodelist(nodelist)


def _deepspeed(nodes: int, devices: int, port: int) -> list[str]:
    """DeepSpeed's launcher: its console script, or the same runner as a module where none is installed (wheels put
    on PYTHONPATH with `pip install --target` install no scripts; the runner starts workers with sys.executable, so
    they inherit this PYTHONPATH)."""
    if shutil.which("deepspeed"):
        runner = ["deepspeed"]
    elif importlib.util.find_spec("deepspeed") is not None:
        runner = [sys.executable, "-m", "deepspeed.launcher.runner"]
    else:
        raise LaunchError(
            "deepspeed is neither on PATH nor importable; install the project (`pip install -e .`) in this environment"
        )
    return [*runner, "--num_nodes", str(nodes), "--num_gpus", str(devices), "--master_port", str(port)]


def command(
    nodes: int,
    devices: int,
    hostfile: Path,
    master_port: int,
    module: str,
    args: list[str],
    launcher: str = "pdsh",
    master_addr: str = "auto",
    env=os.environ,
) -> list[str]:
    """The command line that starts `module` on nodes x devices processes (checked before anything starts)."""
    if nodes < 1 or devices < 1:
        raise LaunchError(f"train.nodes={nodes}, train.devices={devices}: both must be at least 1")
    if launcher not in LAUNCHERS:
        raise LaunchError(f"train.launcher={launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if nodes == 1 and devices == 1:
        return [sys.executable, "-m", module, *args]
    if launcher == "slurm" and nodes > 1:
        return _slurm(nodes, devices, master_port, module, args, master_addr, env)
    if launcher == "no_ssh" and nodes > 1:
        return _no_ssh(nodes, devices, hostfile, master_port, module, args, master_addr, env)
    if master_port:
        check_port(master_port)
    cmd = _deepspeed(nodes, devices, master_port or free_port())
    if nodes > 1:
        check_hosts(hostfile, nodes, devices)
        cmd += ["--hostfile", str(hostfile)]
    elif hostfile.is_file():
        cmd += ["--hostfile", str(hostfile)]
    return [*cmd, "--module", module, *args]


def _no_ssh(nodes, devices, hostfile, master_port, module, args, master_addr, env) -> list[str]:
    rank = env.get("RSB_NODE_RANK", env.get("SLURM_NODEID"))
    if rank is None or not rank.isdigit() or not 0 <= int(rank) < nodes:
        raise LaunchError(
            f"train.launcher=no_ssh: this node's rank is {rank!r}; set RSB_NODE_RANK to 0..{nodes - 1} "
            "on each node (under SLURM, SLURM_NODEID is used)"
        )
    if not master_port:
        raise LaunchError(
            "train.launcher=no_ssh: set train.master_port (e.g. 29500): every node must use the same "
            "rendezvous port, and 0 picks a different free port on each"
        )
    hosts = check_hosts(hostfile, nodes, devices)
    addr = master_addr if master_addr != "auto" else env.get("MASTER_ADDR", hosts[0])
    if rank == "0":  # this node's rank 0 listens on the port
        check_port(master_port)
    return [
        *_deepspeed(nodes, devices, master_port),
        "--hostfile",
        str(hostfile),
        "--no_ssh",
        "--node_rank",
        rank,
        "--master_addr",
        addr,
        "--module",
        module,
        *args,
    ]


def _slurm(nodes, devices, master_port, module, args, master_addr, env) -> list[str]:
    hosts = slurm_hosts(env)
    if len(hosts) < nodes:
        raise LaunchError(
            f"train.nodes={nodes}, but the allocation has {len(hosts)} node(s) ({','.join(hosts)}); "
            "request more nodes or lower train.nodes"
        )
    hostfile = Path(f"hostfile.slurm-{env.get('SLURM_JOB_ID', 'local')}")
    hostfile.write_text("".join(f"{h} slots={devices}\n" for h in hosts[:nodes]))
    addr = hosts[0] if master_addr == "auto" else master_addr
    return [
        "srun",
        f"--nodes={nodes}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        sys.executable,
        "-m",
        "rsb.launch",
        "--launcher",
        "no_ssh",
        "--nodes",
        str(nodes),
        "--devices",
        str(devices),
        "--hostfile",
        str(hostfile),
        "--master-port",
        str(master_port or free_port()),
        "--master-addr",
        addr,
        module,
        *args,
    ]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start a stage on nodes x devices processes.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--hostfile", type=Path, default=Path("hostfile"))
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("--launcher", default="pdsh")
    p.add_argument("--master-addr", default="auto")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    from rsb.config import Train, check_option

    for flag, key in (
        ("--nodes", "nodes"),
        ("--devices", "devices"),
        ("--master-port", "master_port"),
        ("--launcher", "launcher"),
    ):
        check_option(Train, key, getattr(a, key), flag)
    cmd = command(a.nodes, a.devices, a.hostfile, a.master_port, a.module, a.args, a.launcher, a.master_addr)
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    from rsb import errors

    errors.run(main)
