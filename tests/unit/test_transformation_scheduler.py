"""The TransformationScheduler with a fake host: reservations, held requests, release after
the merge, hold-down splits without oscillation, failures and fallbacks."""
from __future__ import annotations

import threading

import pytest

from gyges.config import GygesConfig
from gyges.control.channel import ControlError
from gyges.control.dispatch_ledger import SETTLE_S
from gyges.control.scheduler import MAX_MERGE_FAILURES, TransformationScheduler
from gyges.host_controller import RankLoad
from gyges.topology import Topology

CAP = 1000  # one replica's KV slots; usable 992 (slack 8 at page size 1)
HOLD_DOWN = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeHost:
    """Topology, loads and a transformer whose jobs finish when the test says so."""

    def __init__(self, dp: int = 4, clock: Clock | None = None) -> None:
        self.topo = Topology.boot(dp)
        self.clock = clock or Clock()
        self.load: dict[int, RankLoad] = {}
        self.paused_ranks: frozenset[int] = frozenset()
        self.jobs: dict[int, object] = {}
        self.started: list[tuple[str, tuple[int, ...]]] = []
        self.held: list = []
        self.refuse: ControlError | None = None
        self.capacity_reply: int | None = None
        self.aborts: list[tuple[str, int]] = []

    def topology(self):
        return self.topo

    def loads(self):
        return self.load

    def rank_capacity(self):
        return CAP

    def paused(self):
        return self.paused_ranks

    def start(self, op, ranks):
        if self.refuse is not None:
            raise self.refuse
        if any(r is None for r in self.jobs.values()):
            raise ControlError("a transformation is already running", 409)
        job = len(self.started) + 1
        self.started.append((op, tuple(ranks)))
        self.jobs[job] = None
        self.paused_ranks = frozenset(ranks)
        return job

    def finish(self, error: str | None = None) -> None:
        """Complete the running job (apply it to the topology unless it fails)."""
        job = max(self.jobs)
        op, ranks = self.started[job - 1]
        self.paused_ranks = frozenset()
        if error is not None:
            self.jobs[job] = ControlError(error, 409)
            return
        self.topo = self.topo.merged(ranks) if op == "merge" else self.topo.split(ranks)
        members = {str(r): ({"capacity_tokens": self.capacity_reply}
                            if self.capacity_reply else {}) for r in ranks}
        self.jobs[job] = {"op": op, "ranks": list(ranks), "members": members}
        for fn in self.held:
            fn()
        self.held = []

    def poll(self, job):
        result = self.jobs[job]
        if isinstance(result, ControlError):
            raise result
        return result

    def hold(self, fn):
        if self.paused_ranks != frozenset(range(self.topo.num_ranks)):
            return False
        self.held.append(fn)
        return True

    def abort(self, leader, rid):
        self.aborts.append((rid, leader))

    def idle_snapshots(self) -> None:
        """Every rank publishes an idle snapshot now."""
        self.load = {r: RankLoad(timestamp=self.clock.now) for r in range(self.topo.num_ranks)}


def make(dp=4, policy="gyges", max_tp=None):
    clock = Clock()
    host = FakeHost(dp, clock)
    cfg = GygesConfig.build(enabled=True, tp_size=1, dp_size=dp, max_tp=max_tp, policy=policy,
                            num_kv_heads=4, split_hold_down_s=HOLD_DOWN)
    sched = TransformationScheduler(cfg, host, threading.RLock(), clock=clock)
    sent: list[tuple[str, int]] = []
    return sched, host, clock, sent


def submit(sched, sent, rid, need):
    sched.submit(rid, need, lambda leader: sent.append((rid, leader)))


def settle(sched, host, clock, seconds=SETTLE_S + 0.1):
    clock.now += seconds
    host.idle_snapshots()
    sched.tick()


def test_burst_of_short_requests_spreads_before_any_snapshot():
    sched, host, clock, sent = make()
    for i in range(4):
        submit(sched, sent, f"s{i}", 100)
    assert sorted(leader for _, leader in sent) == [0, 1, 2, 3]
    assert sched.stats.decisions["dispatch"] == 4 and not sched.pending


def test_long_request_reserves_merges_then_dispatches_and_shorts_go_elsewhere():
    sched, host, clock, sent = make()
    host.load = {0: RankLoad(total_tokens=500, running=1, timestamp=clock.now),
                 1: RankLoad(total_tokens=400, running=1, timestamp=clock.now),
                 2: RankLoad(total_tokens=50, running=1, timestamp=clock.now),
                 3: RankLoad(total_tokens=60, running=1, timestamp=clock.now)}
    submit(sched, sent, "long", 1500)  # needs TP2; (2, 3) holds the least KV
    assert not sent and sched.reservations.keys() == {(2, 3)}
    sched.tick()
    assert host.started == [("merge", (2, 3))]
    for i in range(6):  # short requests never wait behind the merge
        submit(sched, sent, f"s{i}", 50)
    assert {leader for _, leader in sent} <= {0, 1} and len(sent) == 6
    st = sched.status()
    assert st["reserved"] == [{"ranks": [2, 3], "for": "long", "waiting_s": 0.0}]
    assert st["pending"][0] | {} == {"rid": "long", "need": 1500, "degree": 2,
                                     "waiting_s": 0.0, "state": "merging"}
    assert st["job"]["op"] == "merge"
    sent.clear()
    host.finish()
    sched.tick()
    assert sent == [("long", 2)] and not sched.reservations and not sched.pending
    assert sched.owned == {(2, 3)}
    assert [d["decision"] for d in sched.log if d["rid"] == "long"] == ["merge", "dispatch"]
    assert sched.stats.merges == {"started": 1, "done": 1}


def test_a_merged_instance_busy_with_the_moved_requests_still_takes_its_request():
    """The members publish their load at the switch: right after the merge the view shows
    the requests that moved in. The long request still goes there (SGLang queues it until
    they free room) instead of counting a failed merge and merging another group."""
    sched, host, clock, sent = make()
    host.load = {r: RankLoad(total_tokens=t, running=1, timestamp=clock.now)
                 for r, t in enumerate((900, 900, 300, 300))}
    submit(sched, sent, "long", 1500)
    sched.tick()
    assert host.started == [("merge", (2, 3))]
    host.finish()
    host.load |= {r: RankLoad(total_tokens=600, running=2, timestamp=clock.now + 0.01)
                  for r in (2, 3)}  # both members: the merged instance, 600 of 1984 used
    sched.tick()
    assert sent == [("long", 2)] and not sched.pending and host.started == [("merge", (2, 3))]
    assert [d["decision"] for d in sched.log if d["rid"] == "long"] == ["merge", "dispatch"]


def test_degree_four_merges_pairwise_then_dispatches_once():
    sched, host, clock, sent = make()
    submit(sched, sent, "huge", 3000)
    for _ in range(3):
        sched.tick()
        assert not sent
        host.finish()
    sched.tick()
    assert [s for _, s in host.started] == [(0, 1), (2, 3), (0, 1, 2, 3)]
    assert sent == [("huge", 0)] and sched.owned == {(0, 1, 2, 3)}


def test_second_long_request_uses_the_merged_instance_while_it_has_room():
    sched, host, clock, sent = make()
    submit(sched, sent, "a", 1200)
    sched.tick()
    host.finish()
    sched.tick()
    submit(sched, sent, "b", 1300)  # 1984 usable - 1200 held by "a" < 1300: merge (2, 3)
    assert sched.reservations.keys() == {(2, 3)}
    settle(sched, host, clock)  # "a" finished: (0, 1) idle, with room again
    host.finish()
    sched.tick()
    submit(sched, sent, "c", 1300)
    assert sent == [("a", 0), ("b", 2), ("c", 0)]


def test_split_after_hold_down_and_no_oscillation():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    sched.tick()
    host.finish()
    sched.tick()
    assert sent == [("long", 0)]
    # Long requests keep arriving faster than the hold-down: the group stays merged.
    for i in range(6):
        settle(sched, host, clock, HOLD_DOWN / 2)
        submit(sched, sent, f"long{i}", 1500)
        assert host.started == [("merge", (0, 1))]
    # Then none: one split, once the hold-down has passed since the last one.
    settle(sched, host, clock, HOLD_DOWN - 1)
    assert len(host.started) == 1
    settle(sched, host, clock, 2)
    assert host.started[-1] == ("split", (0, 1))
    host.finish()
    for _ in range(3):
        settle(sched, host, clock, HOLD_DOWN * 2)
    assert [op for op, _ in host.started] == ["merge", "split"]
    assert sched.owned == set() and sched.stats.splits == {"started": 1, "done": 1}


def test_status_reports_auto_merged_instances_as_the_topology_is_now():
    """A split applied by the host before the scheduler's next tick: status does not list
    the gone instance (a client that saw the new layout reads a consistent status)."""
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    sched.tick()
    host.finish()
    sched.tick()
    assert sched.status()["auto_merged"] == [[0, 1]]
    settle(sched, host, clock, HOLD_DOWN + 1)
    assert host.started[-1] == ("split", (0, 1))
    host.finish()  # no tick yet
    assert sched.status()["auto_merged"] == []


def test_no_split_while_a_long_request_may_run():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    sched.tick()
    host.finish()
    sched.tick()
    clock.now += HOLD_DOWN * 3
    host.load = {r: RankLoad(running=1, total_tokens=1400, timestamp=clock.now) for r in (0, 1)}
    sched.tick()
    assert [op for op, _ in host.started] == ["merge"]
    settle(sched, host, clock, 0.5)  # idle now, but the long request went out 15 s ago
    assert host.started[-1] == ("split", (0, 1))


def test_admin_merged_instances_are_not_split():
    sched, host, clock, sent = make(dp=2)
    host.topo = host.topo.merged((0, 1))
    for _ in range(3):
        settle(sched, host, clock, HOLD_DOWN * 2)
    assert host.started == []


def test_tp4_splits_back_to_tp1_in_steps():
    sched, host, clock, sent = make()
    submit(sched, sent, "huge", 3000)
    for _ in range(3):
        sched.tick()
        host.finish()
    sched.tick()
    settle(sched, host, clock, HOLD_DOWN + 1)
    for _ in range(3):
        assert host.started[-1][0] == "split"
        host.finish()
        settle(sched, host, clock)
    assert host.topo == Topology.boot(4)
    assert [r for op, r in host.started if op == "split"] == [(0, 1, 2, 3), (0, 1), (2, 3)]


def test_short_requests_wait_when_everything_is_reserved_and_go_when_merged():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    submit(sched, sent, "short", 10)  # both ranks reserved, not yet paused: waits here
    assert not sent and [p.rid for p in sched.pending] == ["long", "short"]
    sched.tick()  # the merge starts and pauses every rank
    sched.tick()  # the short request moves to the dispatch gate
    assert sched.status()["pending"][1]["state"] == "held" and len(host.held) == 1
    host.finish()  # the gate releases it: placed again, (0, 1) still reserved
    sched.tick()
    assert ("long", 0) in sent and ("short", 0) in sent and not sched.pending


def test_merge_refused_while_another_transformation_runs_is_retried():
    sched, host, clock, sent = make(dp=2)
    host.refuse = ControlError("a transformation is already running (merge [0, 1])", 409)
    submit(sched, sent, "long", 1500)
    sched.tick()
    sched.tick()
    assert host.started == [] and sched.reservations
    host.refuse = None
    sched.tick()
    host.finish()
    sched.tick()
    assert sent == [("long", 0)]


def test_failed_merges_retry_then_fall_back_to_the_largest_instance():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    for _ in range(MAX_MERGE_FAILURES):
        sched.tick()
        host.finish(error="group busy")
    sched.tick()
    assert sched.stats.merges["failed"] == MAX_MERGE_FAILURES
    assert sent == [("long", 0)] and sched.log[-1]["decision"] == "fallback"


def test_over_capacity_is_rejected_and_forwarded():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "too-big", 5000)
    assert sent == [("too-big", 0)]
    assert sched.log[-1]["decision"] == "reject" and "5000" in sched.log[-1]["reason"]


def test_waiting_is_bounded():
    sched, host, clock, sent = make(dp=2)
    sched.max_pending_s = 10.0
    host.refuse = ControlError("busy", 409)  # the merge never starts
    submit(sched, sent, "long", 1500)
    clock.now += 11
    sched.tick()
    assert sent == [("long", 0)] and not sched.reservations


def test_reported_capacity_of_a_merged_instance_is_used():
    sched, host, clock, sent = make(dp=2)
    host.capacity_reply = 1500  # members say the merged instance holds less than 2 x 1000
    submit(sched, sent, "long", 1800)
    sched.tick()
    host.finish()
    sched.tick()
    assert sched.reported_capacity == {(0, 1): 1500}
    # Not sent to an instance that cannot hold it: it waits (bounded), then falls back.
    assert not sent and sched.pending[0].failures == 1
    assert sched.status()["pending"][0]["reason"] == "no aligned group of 2 ranks is free to merge"
    clock.now += sched.max_pending_s + 1
    sched.tick()
    assert sent == [("long", 0)] and sched.log[-1]["decision"] == "fallback"


@pytest.mark.parametrize("policy", ["round_robin", "llf"])
def test_baselines_merge_on_demand_too(policy):
    sched, host, clock, sent = make(policy=policy)
    submit(sched, sent, "long", 1500)
    sched.tick()
    host.finish()
    sched.tick()
    assert len(sent) == 1 and host.started[0][0] == "merge"
    assert sent[0][1] == host.started[0][1][0]


def test_aborted_held_requests_are_sent_marked_aborted_and_their_merge_is_unused():
    sched, host, clock, sent = make()
    submit(sched, sent, "long", 1500)
    sched.tick()  # merging (0, 1)
    aborts_at_send = []
    original_send = sched.pending[0].send
    sched.pending[0].send = lambda leader: (aborts_at_send.extend(host.aborts),
                                            original_send(leader))
    assert sched.abort("long") == 1
    assert sent == [("long", 2)] and host.aborts == [("long", 2)]  # a live instance
    assert aborts_at_send == [("long", 2)]  # the host knew before the send: marked
    assert not sched.pending and not sched.reservations
    host.finish()
    sched.tick()  # the merge completes unused; it splits after the hold-down
    assert sched.owned == {(0, 1)} and sched.log[-1]["decision"] == "aborted"
    settle(sched, host, clock, HOLD_DOWN + 1)
    assert host.started[-1] == ("split", (0, 1))


def test_abort_of_a_request_held_in_the_gate_waits_for_a_live_instance():
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    submit(sched, sent, "short", 10)
    sched.tick()
    sched.tick()  # every rank paused: "short" is in the gate
    assert sched.abort("", abort_all=True) == 2
    assert sent == [] and host.aborts == []
    host.finish()  # the gate releases both: each is marked aborted, then sent
    assert sorted(sent) == sorted(host.aborts) == [("long", 0), ("short", 0)]
    assert not sched.pending and not sched.reservations


def test_split_is_live_once_the_long_request_is_gone():
    """Short requests running on the merged instance do not keep it merged (they move)."""
    sched, host, clock, sent = make(dp=2)
    submit(sched, sent, "long", 1500)
    sched.tick()
    host.finish()
    sched.tick()
    settle(sched, host, clock)  # the long request finished
    clock.now += HOLD_DOWN
    host.load = {r: RankLoad(running=3, total_tokens=300, timestamp=clock.now) for r in (0, 1)}
    sched.tick()
    assert host.started[-1] == ("split", (0, 1))
