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
free. This module imports only the standard library itself (psutil, a DeepSpeed dependency, when it forwards a signal).

Stop signals (rsb.stopping). With more than one process this launcher stays the parent: a SIGTERM or SIGUSR1 it
receives goes on as SIGUSR1 to every process under it (DeepSpeed's launchers are started ignoring both, so neither
dies of it nor kills the ranks mid-save; its per-node launcher, signalled itself, still ends the ranks after 30 s).
The ranks save at their next update and exit with errors.EXIT_STOPPED, which this launcher returns. Under
train.launcher slurm it also asks SLURM for SIGUSR1 train.slurm_signal_s seconds before the time limit
(`srun --signal=USR1@N`, which reaches every process of the step) and, when the training stopped on it, requeues the
job (`scontrol requeue $SLURM_JOB_ID`): the requeued job's `dvc repro` resumes from the checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rsb.errors import EXIT_STOPPED, RsbError
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


def _deepspeed(nodes: int, devices: int, port: int, visible: bool = False) -> list[str]:
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
    if visible:  # a claimed slot's GPUs: DeepSpeed's runner takes CUDA_VISIBLE_DEVICES when given no count
        return [*runner, "--master_port", str(port)]
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
    slurm_signal_s: int = 0,
    visible: bool = False,
) -> list[str]:
    """The command line that starts `module` on nodes x devices processes (checked before anything starts)."""
    if nodes < 1 or devices < 1:
        raise LaunchError(f"train.nodes={nodes}, train.devices={devices}: both must be at least 1")
    if launcher not in LAUNCHERS:
        raise LaunchError(f"train.launcher={launcher!r}: use one of {', '.join(LAUNCHERS)}")
    if launcher == "slurm":  # one node too: srun carries the signal before the time limit
        return _slurm(nodes, devices, master_port, module, args, master_addr, env, slurm_signal_s)
    if nodes == 1 and devices == 1:
        return [sys.executable, "-m", module, *args]
    if launcher == "no_ssh" and nodes > 1:
        return _no_ssh(nodes, devices, hostfile, master_port, module, args, master_addr, env)
    if master_port:
        check_port(master_port)
    cmd = _deepspeed(nodes, devices, master_port or free_port(), visible)
    if nodes > 1:
        check_hosts(hostfile, nodes, devices)
        cmd += ["--hostfile", str(hostfile)]
    elif hostfile.is_file() and launcher != "no_ssh":  # no_ssh on one node (SLURM's): this node, nothing remote
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


def _slurm(nodes, devices, master_port, module, args, master_addr, env, signal_s) -> list[str]:
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
        *([f"--signal=USR1@{signal_s}"] if signal_s else []),
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
    # machine-side keys read from params.yaml, not from the stage's command: changing them reruns no stage
    p.add_argument("--params", type=Path, default=Path("params.yaml"), help="train.slots, train.slurm_signal_s")
    p.add_argument("--slurm-signal-s", type=int, default=None, help="instead of params' train.slurm_signal_s")
    p.add_argument("--slots", type=int, default=None, help="instead of params' train.slots")
    p.add_argument("module")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    from rsb.config import Train, check_option

    if a.slots is None or a.slurm_signal_s is None:
        from rsb.paramfile import load_section

        train = load_section(a.params, "train", Train) if a.params.is_file() else Train()
        a.slots = train.slots if a.slots is None else a.slots
        a.slurm_signal_s = train.slurm_signal_s if a.slurm_signal_s is None else a.slurm_signal_s

    for flag, key in (
        ("--nodes", "nodes"),
        ("--devices", "devices"),
        ("--master-port", "master_port"),
        ("--launcher", "launcher"),
        ("--slurm-signal-s", "slurm_signal_s"),
        ("--slots", "slots"),
    ):
        check_option(Train, key, getattr(a, key), flag)
    held = None
    if a.slots:  # a node shared by several trainings: this one's slot, claimed before anything starts
        if a.nodes > 1 or a.launcher == "slurm":
            raise LaunchError(
                f"train.slots={a.slots} shares one node between trainings; a run on several nodes (or through "
                "SLURM, which allocates its own) takes whole nodes: set train.slots: 0"
            )
        from rsb import claim

        held = claim.claim(a.slots, a.devices)
        claim.apply(held, os.environ)
        print(f"rsb.launch: {held.describe()} for {a.module}", file=sys.stderr, flush=True)
    cmd = command(
        a.nodes,
        a.devices,
        a.hostfile,
        a.master_port,
        a.module,
        a.args,
        a.launcher,
        a.master_addr,
        slurm_signal_s=a.slurm_signal_s,
        visible=bool(held and held.gpus),
    )
    sys.stdout.flush()
    if cmd[0] == sys.executable:  # one process: it is the rank, and receives the signals itself
        os.execvp(cmd[0], cmd)
    sys.exit(supervise(cmd, requeue=a.launcher == "slurm", keep=() if held is None else (held.fd,)))


STOP = (signal.SIGTERM, signal.SIGUSR1)


def _ignore_stop_signals() -> None:  # in the child, before exec: inherited by DeepSpeed's launchers
    for s in STOP:
        signal.signal(s, signal.SIG_IGN)


def supervise(cmd: list[str], requeue: bool, keep: tuple[int, ...] = ()) -> int:
    """Run the launcher `cmd` as a child, forwarding stop signals to every process under it; its exit status. On a
    stop under SLURM that came from the job's time limit (not a SIGTERM to this process: scancel, pre-emption,
    which SLURM handles itself), the job is requeued."""
    received: list[str] = []

    def forward(signum, frame):
        import psutil

        received.append(signal.Signals(signum).name)
        for child in psutil.Process().children(recursive=True):
            try:
                child.send_signal(signal.SIGUSR1)
            except psutil.Error:
                pass

    child = subprocess.Popen(cmd, preexec_fn=_ignore_stop_signals, pass_fds=keep)  # keep: a slot's lock
    for s in STOP:
        signal.signal(s, forward)
    code = child.wait()
    if code == EXIT_STOPPED or (received and code != 0):
        print(_requeue() if requeue and "SIGTERM" not in received else _stopped(received), file=sys.stderr)
        return EXIT_STOPPED
    return code if code >= 0 else 128 - code


def _stopped(received: list[str]) -> str:
    why = f"on {received[0]}" if received else "on a stop signal"
    return f"stopped: the training stopped {why}; rerun the same command (`dvc repro`) to resume from its checkpoint"


def _requeue() -> str:
    """`scontrol requeue` this job (SLURM puts it back in the queue; it then runs the batch script again)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return _stopped([])
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        detail = " ".join((out.stderr or out.stdout).split()) or f"exit status {out.returncode}"
        return (
            f"stopped: the training saved and stopped before the time limit, but `scontrol requeue {job}` failed "
            f"({detail}); submit the same batch script again: it resumes from the checkpoint"
        )
    return f"stopped: the training saved and stopped before the time limit; job {job} is requeued (scontrol requeue)"


if __name__ == "__main__":
    from rsb import errors

    errors.run(main)
