"""Start a stage on 1..N processes: what dvc.yaml's train command runs.

    python -m rsb.launch --nodes 1 --devices 1 --hostfile hostfile --master-port 0 stages.train --arch X --recipe Y

One process on one node runs the module directly: the DeepSpeed launcher would spawn that same single process, but
through two extra Python interpreters that each import torch and deepspeed (~15 s a stage on a 2-core CPU; see
BENCHMARKS.md). More processes or nodes go through `deepspeed`, the launcher DeepSpeed documents. Either way the
worker trains with the DeepSpeed engine. This module imports only the standard library, so it starts in ~50 ms.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import sys
from pathlib import Path


class LaunchError(ValueError):
    """A launch that cannot work: says which setting or file, and what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_hostfile(path: Path) -> dict[str, int]:
    """DeepSpeed's hostfile format: `<host> slots=<n>` per line, `#` comments. One clear error for anything else."""
    if not path.is_file():
        raise LaunchError(f"train.hostfile={path}: no such file; a multi-node run needs one line `<host> slots=<n>` "
                          "per node (DeepSpeed's hostfile format)")
    hosts = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not m or int(m.group(2)) < 1:
            raise LaunchError(f"{path}:{n}: {line!r} is not `<host> slots=<n>` with n >= 1 (DeepSpeed's hostfile "
                              "format); fix that line")
        if m.group(1) in hosts:
            raise LaunchError(f"{path}:{n}: host {m.group(1)} is listed twice; list each node once")
        hosts[m.group(1)] = int(m.group(2))
    return hosts


def command(nodes: int, devices: int, hostfile: Path, master_port: int, module: str, args: list[str]) -> list[str]:
    """The command line that starts `module` on nodes x devices processes (checked before anything starts)."""
    if nodes < 1 or devices < 1:
        raise LaunchError(f"train.nodes={nodes}, train.devices={devices}: both must be at least 1")
    if nodes == 1 and devices == 1:
        return [sys.executable, "-m", module, *args]
    cmd = ["deepspeed", "--num_nodes", str(nodes), "--num_gpus", str(devices),
           "--master_port", str(master_port or free_port())]
    if nodes > 1:
        hosts = read_hostfile(hostfile)
        if len(hosts) < nodes:
            raise LaunchError(f"{hostfile}: lists {len(hosts)} host(s) but train.nodes={nodes}; add hosts or lower "
                              "train.nodes")
        if short := [h for h, s in list(hosts.items())[:nodes] if s < devices]:
            raise LaunchError(f"{hostfile}: {', '.join(short)} offer fewer slots than train.devices={devices}")
        cmd += ["--hostfile", str(hostfile)]
    elif hostfile.is_file():
        cmd += ["--hostfile", str(hostfile)]
    if shutil.which("deepspeed") is None:
        raise LaunchError("`deepspeed` is not on PATH; install the project (`pip install -e .`) in this environment")
    return [*cmd, "--module", module, *args]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start a stage on nodes x devices processes.")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--hostfile", type=Path, default=Path("hostfile"))
    p.add_argument("--master-port", type=int, default=0)
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    try:
        cmd = command(a.nodes, a.devices, a.hostfile, a.master_port, a.module, a.args)
    except LaunchError as e:
        sys.exit(f"error: {e}")
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
