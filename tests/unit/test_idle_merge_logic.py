"""SGLang-free logic of idle merge/split: topology changes, the dispatch gate, the
transformer job (with a fake bus and routing), dense MLP shards, KV pool re-views and
the follower's command relay."""
from __future__ import annotations

import os
import tempfile
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from gyges.control.channel import ControlError
from gyges.control.commands import CommandBus, CommandClient, command_address
from gyges.control.dispatch_gate import DispatchGate
from gyges.control.transform import Transformer
from gyges.core.dense_shards import owned_mlp_columns
from gyges.switch import capacity
from gyges.topology import Instance, Topology

# -- topology ----------------------------------------------------------------------------


def test_merge_and_split_nest():
    t = Topology.boot(4).merged((0, 1))
    assert [i.ranks for i in t.instances] == [(0, 1), (2,), (3,)]
    t = t.merged((2, 3)).merged((0, 1, 2, 3))
    assert [i.ranks for i in t.instances] == [(0, 1, 2, 3)]
    t = t.split((0, 1, 2, 3))
    assert [i.ranks for i in t.instances] == [(0, 1), (2, 3)]
    assert t.split((2, 3)).split((0, 1)) == Topology.boot(4)


@pytest.mark.parametrize("topo, op, ranks, message", [
    (Topology.boot(4).merged((0, 1)), "merged", (0, 1), "already form one TP2 instance"),
    (Topology.boot(4).merged((0, 1)), "merged", (0, 1, 2, 3), "joins exactly two instances"),
    (Topology.boot(4), "split", (0, 1), "separate TP1 instances"),
    (Topology.boot(4).merged((0, 1)).merged((2, 3)).merged((0, 1, 2, 3)), "split", (0, 1),
     "not one instance"),
])
def test_refused_changes_say_why(topo, op, ranks, message):
    with pytest.raises(ValueError, match=message):
        getattr(topo, op)(ranks)


# -- dispatch gate -----------------------------------------------------------------------


def test_gate_pauses_holds_and_routes_to_leaders():
    gate = DispatchGate(4)
    gate.pause((0, 1))
    assert gate.status() == [False, False, True, True]
    assert not gate.must_hold_request(None)  # ranks 2, 3 still serve
    assert gate.must_hold_request(0) and gate.must_hold_control()
    gate.hold(print, ("held",))
    gate.set_instance((0, 1))
    assert gate.route_to(1) == 0 and gate.route_to(3) == 3 and gate.route_to(None) is None
    assert gate.resume((0, 1)) == [(print, ("held",))]
    assert gate.status() == [True, False, True, True]
    assert not gate.must_hold_control() and gate.num_held == 0
    gate.set_instance((0,))
    gate.set_instance((1,))
    assert gate.status() == [True] * 4


def test_gate_holds_everything_when_no_rank_is_left():
    gate = DispatchGate(2)
    gate.pause((0, 1))
    assert gate.must_hold_request(None)
    gate.hold(len, ((1,),))
    assert gate.resume(()) == []  # still paused: nothing released
    assert gate.resume((0, 1)) == [(len, ((1,),))]


# -- transformer -------------------------------------------------------------------------


class FakeRouting:
    unsupported = None

    def __init__(self):
        self.log = []

    def pause(self, ranks):
        self.log.append(("pause", ranks))

    def resume(self, ranks):
        self.log.append(("resume", ranks))
        return 0

    def set_instance(self, ranks):
        self.log.append(("instance", ranks))


class FakeBus:
    def __init__(self, busy_polls=0, fail=None, block=None, extra=None, only=None):
        self.busy_polls, self.fail, self.block = busy_polls, fail, block
        self.extra, self.only = extra or {}, only  # reply fields of a failure; failing ranks
        self.sent = []

    def run(self, ranks, msg, timeout_s, stop=None):
        if msg["op"].startswith("precopy"):  # pre-copies succeed unless told otherwise
            self.precopies = getattr(self, "precopies", []) + [msg]
            polls = getattr(self, "precopy_polls", None)
            if msg["op"] == "precopy_status" and polls:
                return polls.pop(0)
            bad = getattr(self, "precopy_fault", {}).get(msg["op"])
            if bad is not None:
                return {0: {"ok": True, "done": True, "error": None}, 1: bad}
            return {r: {"ok": True, "started": True, "done": True, "error": None,
                        "precopy_bytes": 10, "precopy_rounds": 1} for r in ranks}
        self.sent.append(msg["op"])
        self.last = msg
        if msg["op"] == "idle":
            idle = self.busy_polls <= 0
            self.busy_polls -= 1
            return {r: {"ok": True, "idle": idle, "ready": idle, "running": 0 if idle else 1,
                        "waiting": 0, "why": None if idle else "chunked prefill"}
                    for r in ranks}
        if self.block is not None:
            self.block.wait(10)
        ok = {r: {"ok": True, "id": 1, "rank": r, "phases_ms": {}} for r in ranks}
        if self.fail:
            return {**ok, **{r: {"ok": False, "error": self.fail, **self.extra}
                             for r in ranks if self.only is None or r in self.only}}
        return ok


def make(bus, idle_timeout_s=5.0, num_ranks=2):
    state = {"topo": Topology.boot(num_ranks)}
    routing = FakeRouting()
    tr = Transformer(num_ranks=num_ranks, max_tp=num_ranks, bus=bus,
                     bus_lock=threading.Lock(), routing=routing,
                     get_topology=lambda: state["topo"],
                     set_topology=lambda t: state.update(topo=t),
                     describe=lambda i: {"ranks": list(i.ranks), "tp": i.tp},
                     idle_timeout_s=idle_timeout_s)
    return tr, routing, state


def finish(tr, job):
    out = tr.poll({"job": job, "wait_s": 5})
    assert out["done"]
    return out["result"]


def test_merge_waits_until_ready_then_switches_and_reroutes():
    tr, routing, state = make(FakeBus(busy_polls=2))
    res = finish(tr, tr.start({"op": "merge", "ranks": [1, 0]})["job"])
    assert res["instances"] == [{"ranks": [0, 1], "tp": 2}] and res["ready_polls"] == 3
    assert state["topo"].instances == (Instance((0, 1)),)
    assert routing.log == [("pause", (0, 1)), ("instance", (0, 1)), ("resume", (0, 1))]
    res = finish(tr, tr.start({"op": "split", "ranks": [0, 1]})["job"])
    assert [i["ranks"] for i in res["instances"]] == [[0], [1]]
    assert state["topo"] == Topology.boot(2)


class MovingBus(FakeBus):
    """Members report the requests their new instance holds: ``counts[op][rank]``."""

    def __init__(self, counts):
        super().__init__()
        self.counts = counts

    def run(self, ranks, msg, timeout_s, stop=None):
        out = super().run(ranks, msg, timeout_s, stop)
        for r, n in self.counts.get(msg["op"], {}).items():
            if r in out:
                # a parked chunked prefill is reported by every rank of its old instance:
                # here TP2 [0, 1]'s in the merge to TP4, and the TP4's in its split
                parked = msg["op"] == "split" or (len(ranks) == 4 and r < 2)
                out[r].update(running=n, waiting=1, chunked_prefills_parked=int(parked))
        return out


def test_requests_moved_counts_the_merged_instance_once_and_both_halves_of_a_split():
    tr, _, _ = make(MovingBus({"merge": {0: 3, 1: 3, 2: 3, 3: 3},
                               "split": {0: 1, 1: 1, 2: 2, 3: 2}}), num_ranks=4)
    for a, b in ((0, 1), (2, 3)):
        finish(tr, tr.start({"op": "merge", "ranks": [a, b]})["job"])
    res = finish(tr, tr.start({"op": "merge", "ranks": [0, 1, 2, 3]})["job"])
    # TP2 [0, 1] parked its chunked prefill (both its ranks say so): one request
    assert res["requests_moved"] == {"running": 3, "waiting": 1, "chunked_prefills": 1}
    # TP4 -> 2 x TP2: one count per half (its leader's), not one per member; the TP4's
    # four ranks each report its one parked prefill
    res = finish(tr, tr.start({"op": "split", "ranks": [0, 1, 2, 3]})["job"])
    assert res["requests_moved"] == {"running": 3, "waiting": 2, "chunked_prefills": 1}


def test_precopy_then_cutover_with_precopy_and_its_figures():
    bus = FakeBus()
    tr, routing, _ = make(bus)
    res = finish(tr, tr.start({"op": "merge", "ranks": [0, 1]})["job"])
    assert [m["op"] for m in bus.precopies] == ["precopy", "precopy_status"]
    assert bus.last["precopy"] is True and res["precopy"]["bytes"] == 0  # fake members
    assert {"precopy_ms", "cutover_ms"} <= res["elapsed_ms"].keys()
    assert tr.last["op"] == "merge" and tr.last["status"] == 200
    assert tr.last["precopy"] == res["precopy"] and tr.last["cutover_ms"] > 0
    res = finish(tr, tr.start({"op": "split", "ranks": [0, 1], "precopy": False})["job"])
    assert len(bus.precopies) == 2 and bus.last["precopy"] is False and "precopy" not in res


def test_precopy_that_cannot_start_falls_back_to_stop_the_world():
    bus = FakeBus()
    bus.precopy_fault = {"precopy": {"ok": False, "error": "Refused: refused: no side group"}}
    tr, _, state = make(bus)
    res = finish(tr, tr.start({"op": "merge", "ranks": [0, 1]})["job"])
    assert bus.last["precopy"] is False and "no side group" in res["precopy"]["skipped"]
    assert bus.precopies[-1]["op"] == "precopy_drop" and state["topo"].instances == (
        Instance((0, 1)),)


def test_precopy_without_staging_memory_falls_back_to_stop_the_world():
    bus = FakeBus()
    bus.precopy_fault = {"precopy_status": {"ok": True, "done": True, "fallback": True,
                                            "error": "pre-copy unavailable: no staging"}}
    tr, _, state = make(bus)
    res = finish(tr, tr.start({"op": "merge", "ranks": [0, 1]})["job"])
    assert bus.last["precopy"] is False and "no staging" in res["precopy"]["skipped"]
    drop = bus.precopies[-1]
    assert drop["op"] == "precopy_drop" and drop["broken"] is None
    assert state["topo"].instances == (Instance((0, 1)),)


def test_a_fallback_seen_on_one_member_first_waits_for_the_others():
    """Members fall back alike (they agreed on it) but finish at their own time: a poll
    that sees one member done with the fallback and one still running is no failure."""
    bus = FakeBus()
    unavailable = {"ok": True, "done": True, "fallback": True,
                   "error": "pre-copy unavailable: no staging"}
    running = {"ok": True, "done": False, "error": None}
    bus.precopy_polls = [{0: unavailable, 1: running}, {0: running, 1: unavailable},
                         {0: unavailable, 1: unavailable}]
    tr, _, state = make(bus)
    res = finish(tr, tr.start({"op": "merge", "ranks": [0, 1]})["job"])
    assert bus.precopy_polls == [] and "no staging" in res["precopy"]["skipped"]
    assert bus.last["precopy"] is False and bus.precopies[-1]["broken"] is None
    assert state["topo"].instances == (Instance((0, 1)),)


def test_precopy_that_fails_is_409_nothing_changed_and_the_group_is_dropped():
    bus = FakeBus()
    bus.precopy_fault = {"precopy_status": {"ok": True, "done": True,
                                            "error": "pre-copy failed on rank 1: boom"}}
    tr, routing, state = make(bus)
    e = _fails(tr)
    assert e.status == 409 and "pre-copy failed on rank 1" in str(e)
    assert tr.last["status"] == 409 and "pre-copy failed" in tr.last["error"]
    assert "merge" not in bus.sent and state["topo"] == Topology.boot(2)
    drop = bus.precopies[-1]
    assert drop["op"] == "precopy_drop" and "boom" in drop["broken"]
    assert ("pause", (0, 1)) not in routing.log  # dispatch never stopped


def test_what_holds_a_transformation_is_reported_while_it_waits():
    tr, _, _ = make(FakeBus(busy_polls=10**6), idle_timeout_s=1.0)
    job = tr.start({"op": "merge", "ranks": [0, 1]})["job"]
    deadline = time.monotonic() + 5
    while not tr.held_by:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert tr.held_by == {0: "chunked prefill", 1: "chunked prefill"}
    with pytest.raises(ControlError, match="group busy"):
        tr.poll({"job": job, "wait_s": 5})


def test_busy_group_gets_409_and_dispatch_resumes():
    tr, routing, state = make(FakeBus(busy_polls=10**6), idle_timeout_s=0.2)
    job = tr.start({"op": "merge", "ranks": [0, 1]})["job"]
    with pytest.raises(ControlError, match="group busy") as e:
        tr.poll({"job": job, "wait_s": 5})
    assert e.value.status == 409
    assert routing.log[-1] == ("resume", (0, 1)) and state["topo"] == Topology.boot(2)


def _fails(tr):
    with pytest.raises(ControlError) as e:
        tr.poll({"job": tr.start({"op": "merge", "ranks": [0, 1]})["job"], "wait_s": 5})
    return e.value


def test_member_refusal_is_retried_then_409_other_refusals_409_at_once():
    bus = FakeBus(fail="Refused: group busy: rank 1 has unread requests")
    tr, routing, _ = make(bus, idle_timeout_s=0.3)
    assert _fails(tr).status == 409 and bus.sent.count("merge") > 1
    assert routing.log[-1] == ("resume", (0, 1))
    bus = FakeBus(fail="Refused: refused: rank 1: the architecture cannot merge")
    tr, routing, state = make(bus)
    e = _fails(tr)
    assert e.status == 409 and "architecture" in str(e) and bus.sent.count("merge") == 1
    assert state["topo"] == Topology.boot(2) and routing.log[-1] == ("resume", (0, 1))


@pytest.mark.parametrize("extra, only", [({"fatal": True}, None), ({"fatal": True}, {1}),
                                         ({}, {1})])
def test_failure_after_commit_is_500_host_out_and_ranks_stay_paused(extra, only):
    """A fatal reply, or members that disagree (one failed, one did not), fail the host:
    500 naming the cause, on_fatal called once, the group's ranks never resumed, no
    retry, and no later transformation starts."""
    bus = FakeBus(fail="TransformationFailed: transformation failed on rank 1: boom",
                  extra=extra, only=only)
    tr, routing, state = make(bus)
    fatal = []
    tr.on_fatal = fatal.append
    tr.stop = lambda: fatal[0] if fatal else None
    e = _fails(tr)
    assert e.status == 500 and "rank 1: boom" in str(e) and "out of service" in str(e)
    assert len(fatal) == 1 and "rank 1: boom" in fatal[0] and bus.sent.count("merge") == 1
    assert ("resume", (0, 1)) not in routing.log and state["topo"] == Topology.boot(2)
    with pytest.raises(ControlError, match="out of service") as later:
        tr.start({"op": "merge", "ranks": [0, 1]})
    assert later.value.status == 503


def test_broken_group_is_refused_then_never_used_again():
    bus = FakeBus(fail="GroupBroken: rank 0: the vote over [0, 1] failed: timeout",
                  extra={"broken": True})
    tr, routing, state = make(bus)
    e = _fails(tr)
    assert e.status == 422 and "nothing changed" in str(e)
    assert routing.log[-1] == ("resume", (0, 1)) and state["topo"] == Topology.boot(2)
    with pytest.raises(ControlError, match="broken") as later:
        tr.start({"op": "merge", "ranks": [0, 1]})
    assert later.value.status == 422


def test_second_transformation_gets_409_bad_ones_400():
    block = threading.Event()
    tr, _, _ = make(FakeBus(block=block))
    job = tr.start({"op": "merge", "ranks": [0, 1]})["job"]
    assert tr.poll({"job": job}) == {"done": False}
    with pytest.raises(ControlError, match="already running") as e:
        tr.start({"op": "merge", "ranks": [0, 1]})
    assert e.value.status == 409
    block.set()
    finish(tr, job)
    for body, message in [({"ranks": [0]}, "at least 2"), ({"ranks": [0, 1]}, "already form"),
                          ({"ranks": [0, 7]}, "unknown rank")]:
        op = "merge"
        with pytest.raises(ControlError, match=message) as e:
            tr.start({"op": op, **body})
        assert e.value.status == 400
    with pytest.raises(ControlError, match="unknown job"):
        tr.poll({"job": 999})


# -- dense MLP shards and the KV pool view -------------------------------------------------


def test_mlp_columns_partition_and_nest():
    cols = {r: owned_mlp_columns(8, 4, 2, r).tolist() for r in range(2)}
    assert cols == {0: [0, 1, 4, 5], 1: [2, 3, 6, 7]}
    assert owned_mlp_columns(8, 4, 1, 0).tolist() == list(range(8))
    tp4 = [set(owned_mlp_columns(16, 4, 4, r).tolist()) for r in range(4)]
    assert tp4[0] | tp4[2] == set(owned_mlp_columns(16, 4, 2, 0).tolist())
    with pytest.raises(ValueError):
        owned_mlp_columns(6, 4, 2, 0)


def test_pool_views_at_degree_k_hold_k_times_the_slots():
    from gyges.core.kv_layout import HeadMajorLayout

    heads, slots, d, page = 4, 8, 3, 2
    layout = HeadMajorLayout(heads, slots, d)
    k_st = [layout.allocate(torch.float32)]
    v_st = [layout.allocate(torch.float32)]
    pool = SimpleNamespace(gyges_k_layout=layout, gyges_v_layout=layout, gyges_k_storage=k_st,
                           gyges_v_storage=v_st, head_dim=d, v_head_dim=d, page_size=page,
                           k_data_ptrs=torch.zeros(1, dtype=torch.uint64))
    capacity.view_pool(pool, 2)
    assert pool.k_buffer[0].shape == (2 * slots, 2, d) and pool.head_num == 2
    assert pool.k_buffer[0].data_ptr() == k_st[0].data_ptr() and pool.row_dim == 2 * d
    assert capacity.capacity_at(pool, 2) == 2 * slots - page
    capacity.view_pool(pool, 1)
    assert pool.k_buffer[0].shape == (slots, heads, d)


def test_free_pages_are_every_page_no_row_uses():
    alloc = SimpleNamespace(page_size=2, size=14, device="cpu", free_group=[1],
                            release_pages=torch.tensor([3]))
    s = SimpleNamespace(token_to_kv_pool_allocator=alloc)
    capacity.set_free_pages(s, torch.tensor([2, 3, 9, 13]))
    assert alloc.free_pages.tolist() == [2, 3, 5, 7] and alloc.free_group is None
    assert alloc.release_pages.numel() == 0


# -- follower relay ----------------------------------------------------------------------


def test_take_consumes_own_copy_and_refuses_unrelayed_commands():
    address = command_address("ipc://" + os.path.join(tempfile.mkdtemp(), "tok"))
    bus = CommandBus(address)
    client = CommandClient(address, 1, {"noop": lambda m: {}})
    time.sleep(0.1)
    try:
        replies = {}
        t = threading.Thread(target=lambda: replies.update(
            bus.run([1], {"op": "noop"}, timeout_s=5)))
        t.start()
        deadline = time.monotonic() + 5
        while not client._sock.poll(10) and time.monotonic() < deadline:
            pass
        # the relayed command has another id: this copy is answered with an error
        assert not client.take(cid=12345, timeout_s=0.3)
        t.join()
        assert not replies[1]["ok"] and "follower" in replies[1]["error"]
        t = threading.Thread(target=lambda: replies.update(
            bus.run([1], {"op": "noop"}, timeout_s=5)))
        t.start()
        assert client.take(cid=2, timeout_s=5)
        client.answer({"op": "noop", "id": 2})
        t.join()
        assert replies[1]["ok"]
    finally:
        client.close()
        bus.close()


def test_finished_jobs_are_observed_with_status_and_result():
    seen = []
    tr, _, _ = make(FakeBus())
    tr.observe = lambda op, status, s, result: seen.append((op, status, result is not None))
    finish(tr, tr.start({"op": "merge", "ranks": [0, 1]})["job"])
    tr2, _, _ = make(FakeBus(fail="boom", extra={"fatal": True}))
    tr2.observe = tr.observe
    with pytest.raises(ControlError):
        tr2.poll({"job": tr2.start({"op": "merge", "ranks": [0, 1]})["job"], "wait_s": 5})
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [("merge", 200, True), ("merge", 500, False)]


def test_transform_metrics_count_bytes_and_durations(tmp_path, monkeypatch):
    import prometheus_client

    from gyges.control.transform_metrics import TransformMetrics

    registry = prometheus_client.CollectorRegistry()
    monkeypatch.setattr(prometheus_client.metrics, "REGISTRY", registry, raising=False)
    for name in ("Counter", "Histogram"):
        cls = getattr(prometheus_client, name)
        monkeypatch.setattr(prometheus_client, name,
                            lambda *a, _cls=cls, **k: _cls(*a, registry=registry, **k))
    m = TransformMetrics()
    m.observe("merge", 200, 0.12, {"kv_bytes_moved": 1000, "weight_bytes_released": 64})
    m.observe("split", 409, 0.5, None)
    get = registry.get_sample_value
    assert get("gyges:transformations_total", {"op": "merge", "outcome": "ok"}) == 1
    assert get("gyges:transformations_total", {"op": "split", "outcome": "refused"}) == 1
    assert get("gyges:kv_bytes_moved_total", {"op": "merge"}) == 1000
    assert get("gyges:weight_bytes_released_total") == 64
    assert get("gyges:transformation_duration_seconds_count", {"op": "merge"}) == 1
    m.observe("split", 200, 0.3, {"kv_bytes_moved": 10, "elapsed_ms": {"cutover_ms": 40.0},
                                  "precopy": {"bytes": 5000, "weight_bytes": 32}})
    assert get("gyges:precopy_bytes_total", {"op": "split"}) == 5000
    assert get("gyges:cutover_seconds_sum", {"op": "split"}) == pytest.approx(0.04)


def test_a_front_end_polling_a_running_job_does_not_hold_the_control_channel(tmp_path):
    """The HTTP server's /health asks the controller with a 2 s budget while a merge runs;
    the merge's own job polls come through the same single-threaded channel (until
    2026-12-07 each poll waited up to 2 s there, so /health could answer 503 mid-merge)."""
    from gyges.config import GygesConfig
    from gyges.control.channel import ControlServer, control_address, request
    from gyges.host_controller import HostController

    block = threading.Event()
    tr, _, _ = make(FakeBus(block=block))
    cfg = GygesConfig.build(enabled=True, tp_size=1, dp_size=2, max_tp=None, policy="gyges",
                            num_kv_heads=4)
    host = HostController(cfg, lambda: {})
    host.transformer = tr
    addr = control_address(f"ipc://{tmp_path}/ctl")
    ControlServer(addr, host.handlers()).start()
    job = tr.start({"op": "merge", "ranks": [0, 1]})["job"]
    polls: list[dict] = []
    try:
        poller = threading.Thread(target=lambda: polls.append(
            request(addr, {"op": "job", "job": job, "wait_s": 2.0}, timeout_s=10)))
        poller.start()
        time.sleep(0.2)  # the poll is being served
        assert request(addr, {"op": "health"}, timeout_s=1.5) == {"ok": True,
                                                                  "out_of_service": None}
        poller.join(timeout=10)
        assert polls == [{"ok": True, "done": False}]
    finally:
        block.set()
    deadline = time.monotonic() + 10
    while not (reply := request(addr, {"op": "job", "job": job}))["done"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert reply["result"]["op"] == "merge"
