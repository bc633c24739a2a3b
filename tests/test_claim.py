"""rsb.claim: a node's slots, one per training sharing it; a crash frees its slot. The trainings themselves, side
by side against one after another: test_studies.py::test_two_seeds_side_by_side_equal_the_same_seeds_in_turn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from rsb import claim
from rsb.claim import NoFreeSlot


@pytest.fixture
def slots_here(tmp_path, monkeypatch):
    monkeypatch.setenv("RSB_SLOT_DIR", str(tmp_path / "slots"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU's slots, also on a machine with GPUs
    return tmp_path / "slots"


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU slots need two cores")
def test_each_claim_gets_its_own_slot_and_a_full_node_says_who_holds_it(slots_here):
    a, b = claim.claim(2, 1), claim.claim(2, 1)
    per = len(cores()) // 2
    assert (a.index, b.index) == (0, 1) and a.cores == tuple(cores()[:per]) and b.cores == tuple(cores()[per : 2 * per])
    assert set(a.cores).isdisjoint(b.cores)
    with pytest.raises(
        NoFreeSlot, match=rf"train.slots=2: every slot under {slots_here} is held \(slot 0: pid {os.getpid()}"
    ):
        claim.claim(2, 1)
    os.close(a.fd)  # the training holding slot 0 ends
    assert claim.claim(2, 1).index == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPU slots need two cores")
def test_a_training_killed_while_holding_its_slot_frees_it(slots_here):
    """A process that claimed slot 0 and started a child (which inherits the lock, as a training's ranks do) is
    killed with its child (kill -9): the kernel drops the lock, and the next claim gets slot 0 again."""
    code = (
        "import os, subprocess, sys; from rsb import claim; c = claim.claim(2, 1); "
        "p = subprocess.Popen(['sleep', '60'], pass_fds=(c.fd,)); print(p.pid, flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    assert claim.claim(2, 1).index == 1, "slot 0 is held"
    holder.kill()
    holder.wait()
    with pytest.raises(NoFreeSlot):  # the child still holds slot 0 (a rank outliving its launcher keeps it)
        claim.claim(2, 1)
    os.kill(child, signal.SIGKILL)
    for _ in range(100):
        try:
            assert claim.claim(2, 1).index == 0
            break
        except NoFreeSlot:  # the kernel closes a killed process's files as it exits, not at the signal
            time.sleep(0.05)
    else:
        pytest.fail("slot 0 was not freed by the kill")


def test_gpu_slots_are_groups_of_the_visible_gpus(slots_here, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    got = [claim.claim(4, 2) for _ in range(4)]
    assert [c.gpus for c in got] == [("0", "1"), ("2", "3"), ("4", "5"), ("6", "7")]
    env: dict = {}
    claim.apply(got[2], env)
    assert env == {"RSB_SLOT": "slot 2 of 4 (GPUs 4,5)", "CUDA_VISIBLE_DEVICES": "4,5"}
    with pytest.raises(NoFreeSlot, match=r"8 GPU\(s\) make slots of 2, but train.devices=4"):
        claim.claim(4, 4)
