"""The policies one run compares, each built on the same cost model and trace.

Static: ``static-dp`` (TP1 replicas), ``static-tp2/4/8`` (replicas of that degree),
``static-mix`` (half of each host as TP1 replicas, the other half as one instance).
Elastic, driven by the live ``TransformationScheduler``: ``gyges`` (Algorithm 1, the
router's gyges placement), ``gyges-rr`` / ``gyges-llf`` (the scheduler's round_robin/llf
baselines behind the router's round_robin/least_load), ``flying`` and ``loongserve``.
``shift``: one instance per host switching TP/SP. docs/simulator.md says what each peer
takes from its paper and what is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from gyges.config import GygesConfig, GygesConfigError
from gyges.sim.cost import CostParams, MemoryPlan, StepCost, TransformCost
from gyges.sim.engine import EventLoop
from gyges.sim.fleet import ElasticFleet, StaticFleet
from gyges.sim.host import ElasticKind, SimHost, TransformRecord
from gyges.sim.instance import Finished, SimRequest
from gyges.sim.models import ModelSpec, SimInputError
from gyges.sim.steps import ESPStep, ShiftStep, TPStep

STATIC = ("static-dp", "static-tp2", "static-tp4", "static-tp8", "static-mix")
ELASTIC = ("gyges", "gyges-rr", "gyges-llf", "flying", "loongserve")
POLICIES = (*STATIC, *ELASTIC, "shift")

# Flying Serving (published): a DP->TP switch takes 0.19 s when idle, of which the
# cutover (the only pause) is at most 10 ms; a split is assumed to cost the same.
FLYING_SWITCH_S, FLYING_CUTOVER_S = 0.19, 0.010
# LoongServe: elastic scale-up/down migrates KV proactively; assumed 5 ms of pause.
LOONGSERVE_SCALE_S = 0.005
SHIFT_THRESHOLD_TOKENS = 256  # assumed switch point (tokens per step) TP -> SP


@dataclass(frozen=True)
class SimSetup:
    model: ModelSpec
    params: CostParams
    hosts: int
    gpus_per_host: int
    hold_down_s: float = 5.0
    seed: int = 0


Fleet = StaticFleet | ElasticFleet


class Infeasible(Exception):
    """This policy cannot serve the model on these GPUs (reported, not fatal)."""


def check_setup(s: SimSetup) -> None:
    """Exit-2 conditions: the model fits no degree at all on one host."""
    plan = MemoryPlan(s.model, s.params, s.gpus_per_host)
    if s.gpus_per_host < 1 or s.gpus_per_host & (s.gpus_per_host - 1):
        raise SimInputError(f"--gpus-per-host must be a power of two, got {s.gpus_per_host}")
    if s.hosts < 1:
        raise SimInputError("--hosts must be >= 1")
    if plan.base_degree("static", s.gpus_per_host) is None:
        raise SimInputError(
            f"{s.model.name} ({s.model.weight_bytes / 2**30:.0f} GiB of weights) does not fit "
            f"{s.gpus_per_host} x {s.params.name} at any degree")


def build(name: str, s: SimSetup, loop: EventLoop, on_finish: Finished,
          records: list[TransformRecord]) -> Fleet:
    """The fleet for policy ``name``; raises :class:`Infeasible`."""
    g, m = s.gpus_per_host, s.model
    cost = StepCost(m, s.params)
    plan = MemoryPlan(m, s.params, g)
    if name in STATIC:
        if name == "static-mix":
            if g < 2:
                raise Infeasible("static-mix needs at least 2 GPUs per host")
            layout = [(1, plan.static(1), TPStep(cost, 1))] * (g // 2) + [
                (g // 2, plan.static(g // 2), TPStep(cost, g // 2))]
        else:
            k = 1 if name == "static-dp" else int(name.removeprefix("static-tp"))
            if k > g:
                raise Infeasible(f"TP{k} needs {k} GPUs per host")
            layout = [(k, plan.static(k), TPStep(cost, k))] * (g // k)
        if any(cap <= 0 for _, cap, _ in layout):
            raise Infeasible("the weights leave no KV cache at this degree")
        return StaticFleet(loop, s.hosts, layout, on_finish, s.params.host_cores)
    if name == "shift":
        cap = plan.shift(g)
        if cap <= 0:
            raise Infeasible("TP shards plus a full SP replica leave no KV cache")
        return StaticFleet(loop, s.hosts, [(g, cap, ShiftStep(cost, g, SHIFT_THRESHOLD_TOKENS))],
                           on_finish, s.params.host_cores)
    if name not in ELASTIC:
        raise SimInputError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    return _elastic(name, s, loop, on_finish, records, cost, plan)


def _elastic(name: str, s: SimSetup, loop: EventLoop, on_finish: Finished,
             records: list[TransformRecord], cost: StepCost, plan: MemoryPlan) -> ElasticFleet:
    g, m = s.gpus_per_host, s.model
    holds = "gyges" if name.startswith("gyges") else ("flying" if name == "flying" else "static")
    base = plan.base_degree(holds, g)
    if base is None:
        raise Infeasible("one replica cannot hold the weights at any degree")
    ranks = g // base
    if holds == "gyges":
        tc = TransformCost(m, s.params, plan, base)
        kind = ElasticKind(lambda k: plan.gyges(k * base, base),
                           lambda k: TPStep(cost, k * base),
                           lambda op, a, b, used: tc.duration(op, a, b, used),
                           long_first=True)
    elif name == "flying":
        kind = ElasticKind(lambda k: plan.flying(k * base, base),
                           lambda k: TPStep(cost, k * base),
                           lambda op, a, b, used: (FLYING_SWITCH_S, FLYING_CUTOVER_S, 0))
    else:
        kind = ElasticKind(lambda k: k * plan.static(base), lambda k: ESPStep(cost, k, base),
                           lambda op, a, b, used: (LOONGSERVE_SCALE_S, LOONGSERVE_SCALE_S, 0))
    sched_policy = {"gyges-rr": "round_robin", "gyges-llf": "llf"}.get(name, "gyges")
    router_policy = {"gyges": "gyges", "gyges-rr": "round_robin"}.get(name, "least_load")
    heads = m.kv_heads // base if m.kv_heads % base == 0 else 1
    try:
        config = GygesConfig.build(enabled=True, tp_size=1, dp_size=ranks, max_tp=None,
                                   policy=sched_policy, num_kv_heads=heads,
                                   split_hold_down_s=s.hold_down_s)
    except GygesConfigError as e:
        raise Infeasible(str(e)) from None

    def make_host(index: int, finished: Finished) -> SimHost:
        return SimHost(index, loop, ranks, kind, config, finished, records,
                       host_cores=s.params.host_cores)

    return ElasticFleet(loop, make_host, s.hosts, router_policy, on_finish, s.seed)


def make_request(rid: int, arrival: float, prompt: int, output: int) -> SimRequest:
    return SimRequest(rid, arrival, prompt, output)
