"""HostHealth and the scheduler watchdog: the first failure takes the host out of service,
pauses dispatch at once and exits after the grace period; a dead scheduler is noticed."""

from __future__ import annotations

import threading
import time

import pytest

from gyges.comm.groups import validate_group
from gyges.control.channel import ControlError
from gyges.control.health import HostHealth, watch_schedulers


def _health(grace_s: float = 0.2):
    events, exited = [], threading.Event()
    health = HostHealth(pause_all=lambda: events.append("paused"),
                        exit_host=lambda: (events.append("exit"), exited.set()),
                        grace_s=grace_s)
    return health, events, exited


def test_first_failure_wins_pauses_then_exits_after_grace():
    health, events, exited = _health()
    assert health.reason() is None
    t0 = time.monotonic()
    health.fail("rank 1: boom")
    health.fail("later")
    assert health.reason() == "rank 1: boom" and events == ["paused"]
    assert exited.wait(5) and time.monotonic() - t0 >= 0.2
    assert events == ["paused", "exit"]


def test_watchdog_fails_the_host_when_a_scheduler_exits():
    health, events, exited = _health(grace_s=0.0)
    procs = {0: (100, None), 1: (101, None)}
    watch_schedulers(lambda: dict(procs), health, interval_s=0.01)
    time.sleep(0.05)
    assert health.reason() is None
    procs[1] = (101, -9)
    assert exited.wait(5)
    assert health.reason() == "the scheduler of rank 1 (pid 101) exited with code -9"


def test_rank_lists_are_refused_without_echo():
    with pytest.raises(ControlError, match="larger than this host's 4 ranks") as e:
        validate_group(list(range(10_000)), 4, 4)
    assert e.value.status == 400 and "9999" not in str(e.value)
    with pytest.raises(ControlError) as e:
        validate_group("x" * 100_000, 4, 4)
    assert len(str(e.value)) < 100
