"""rsb.stopping: what the ranks decide after an update (one process here; two through the launcher:
test_reliability.py::test_a_signal_to_one_rank_stops_every_rank_at_the_same_update)."""

from __future__ import annotations

import os
import signal

import pytest

from rsb.config import ConfigError, parse_every
from rsb.stopping import Agreement, StopSignals


def test_the_schedule_counts_updates_or_minutes_and_a_signal_saves_and_stops():
    signals = StopSignals()
    every3 = Agreement(signals, 3)
    assert [every3.decide(u) for u in (1, 2, 3, 6)] == [(False, False), (False, False), (True, False), (True, False)]
    timed = Agreement(signals, "2min")
    assert timed.decide(1) == (False, False)
    timed.last -= 121  # two minutes since the last save, on rank 0's clock
    assert timed.decide(2) == (True, False)
    timed.saved()
    assert timed.decide(3) == (False, False)
    assert Agreement(signals, 0).decide(500) == (False, False), "0: epoch ends only"
    signals.received = "SIGTERM"
    assert Agreement(signals, 0).decide(7) == (True, True)


def test_a_second_signal_changes_nothing_and_the_handlers_are_given_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.received == "SIGUSR1"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == (signal.SIG_IGN, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, before[0])
    signal.signal(signal.SIGUSR1, before[1])
    with StopSignals():
        pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before, "not stopped: given back"


@pytest.mark.parametrize("value", [-1, "30", "0min", 1.5, True, "30 s"])
def test_a_schedule_that_is_neither_updates_nor_minutes_names_the_key(value):
    with pytest.raises(ConfigError, match=r"train.checkpoint_every = .*: use 0 \(epoch ends only\)"):
        parse_every(value)
