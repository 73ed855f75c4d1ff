"""CPU hosts in the simulator (``CostParams.host_cores``): a step calibrated alone takes
``max(c, busy) / max(c, k)`` times as long while ``busy`` processes share ``c`` cores, the
factor follows every change of the busy count at the next step boundary, and a host of
GPUs (``host_cores`` 0) is untouched."""
from __future__ import annotations

import pytest

from gyges.sim.cpu import HostCpu
from gyges.sim.engine import EventLoop
from gyges.sim.fleet import StaticFleet
from gyges.sim.instance import Instance, SimRequest

STEP = 0.01


class Const:
    """Every step takes STEP seconds, prefill or decode."""

    def decode(self, batch: int, ctx_tokens: int) -> float:
        return STEP

    def prefill(self, tokens: int, pairs: float, seqs: int) -> float:
        return STEP


def test_scale_counts_what_the_calibration_already_saw() -> None:
    cpu = HostCpu(2, extra=1)
    assert cpu.scale(1) == 1.0  # the controller alone beside one idle instance
    cpu.busy = 3
    assert cpu.scale(1) == 1.5
    assert cpu.scale(2) == 1.5
    cpu.busy = 4
    assert cpu.scale(4) == 1.0  # TP4 on 2 cores was calibrated at 4 busy processes
    assert cpu.scale(2) == 2.0
    with pytest.raises(ValueError):
        HostCpu(0)


def _finish_times(host_cores: float, second_at: float | None, extra: int = 0
                  ) -> list[SimRequest]:
    loop, done = EventLoop(), []
    cpu = HostCpu(host_cores, extra) if host_cores else None
    a = Instance(loop, (0,), 10_000, Const(), done.append, cpu=cpu)
    b = Instance(loop, (1,), 10_000, Const(), done.append, cpu=cpu)
    first = SimRequest(0, 0.0, 10, 101)  # prefill + 100 decode steps
    loop.at(0.0, lambda: a.enqueue(first))
    if second_at is not None:
        loop.at(second_at, lambda: b.enqueue(SimRequest(1, second_at, 10, 11)))
    loop.run()
    if cpu is not None:
        assert cpu.busy == extra  # every instance went idle again
    return sorted(done, key=lambda r: r.rid)


def test_alone_on_the_cores_the_steps_keep_their_time() -> None:
    (r,) = _finish_times(2, None, extra=1)
    assert r.finish == pytest.approx(101 * STEP)
    (plain,) = _finish_times(0, None)
    assert plain.finish == pytest.approx(101 * STEP)


def test_a_second_busy_instance_slows_both_from_the_next_step_boundary() -> None:
    # 2 cores, the stock DP controller busy: one instance runs at full speed (2 busy), two
    # at 1.5x (3 busy). The second request arrives at 0.2 s (the end of the first's step
    # 20) and runs 11 steps (prefill + 10) at 1.5x; the first's steps 21-31 run at 1.5x
    # too, the rest at 1x again.
    first, second = _finish_times(2, 0.2, extra=1)
    assert second.finish == pytest.approx(0.2 + 11 * 1.5 * STEP)
    assert first.finish == pytest.approx(101 * STEP + 11 * 0.5 * STEP)
    # without the controller two instances fit two cores: nothing slows down
    first, second = _finish_times(2, 0.2)
    assert first.finish == pytest.approx(101 * STEP)
    assert second.finish == pytest.approx(0.2 + 11 * STEP)
    # a GPU host: nothing modelled
    first, second = _finish_times(0, 0.2, extra=1)
    assert first.finish == pytest.approx(101 * STEP)


def test_static_dp_fleet_counts_the_controller_only_with_several_instances() -> None:
    loop, done = EventLoop(), []
    dp = StaticFleet(loop, 1, [(1, 1000, Const())] * 2, done.append, host_cores=2)
    assert dp.instances[0].cpu is not None and dp.instances[0].cpu.busy == 1
    tp = StaticFleet(loop, 1, [(2, 2000, Const())], done.append, host_cores=2)
    assert tp.instances[0].cpu is not None and tp.instances[0].cpu.busy == 0
    gpu = StaticFleet(loop, 1, [(1, 1000, Const())] * 2, done.append)
    assert gpu.instances[0].cpu is None
