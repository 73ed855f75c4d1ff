"""Request need and the largest request a host can serve; merge steps; the dispatch ledger."""
from __future__ import annotations

import pytest

from gyges.control.dispatch_ledger import SETTLE_S, DispatchLedger
from gyges.core.request_limits import (
    DEFAULT_MAX_NEW_TOKENS,
    RequestLimits,
    request_need,
    usable_tokens,
)
from gyges.host_controller import RankLoad
from gyges.topology import Topology, next_merge_step


def test_need_and_usable_slots():
    assert request_need(100, 28) == 128
    assert request_need(100, None) == 100 + DEFAULT_MAX_NEW_TOKENS
    assert usable_tokens(1024, 1) == 1016 and usable_tokens(1024, 16) == 992


def test_usable_slots_are_never_clipped_by_sglang():
    """SGLang's bounds (scheduler.init_req_max_new_tokens, allocator, max_req_input_len)
    leave a request of ``need <= usable`` exactly as asked."""
    for cap in (1000, 1024, 4096):
        for page in (1, 16, 64):
            need = usable_tokens(cap, page)
            for prompt in (1, page - 1, page + 1, need // 2, need - 1):
                new = need - prompt
                max_req_len = cap - 1
                assert prompt < max_req_len - 5
                assert new <= max_req_len - prompt - 1
                paged = -(-prompt // page) * page
                assert new <= cap - paged - page - 1


def test_limits_reject_beyond_the_largest_instance_or_the_context():
    lim = RequestLimits(rank_capacity=1024, max_tp=2, page_size=1, context_len=32768)
    assert lim.max_request_tokens == 2032
    assert lim.rejection(2000, 32) is None
    msg = lim.rejection(3000, 8)
    assert "3008 tokens" in msg and "TP2" in msg and "2032" in msg
    assert "default" in lim.rejection(2000, None)
    small_ctx = RequestLimits(rank_capacity=4096, max_tp=4, context_len=2048)
    assert small_ctx.max_request_tokens == 2048
    assert "context length of 2048" in small_ctx.rejection(2000, 100)


@pytest.mark.parametrize("topo, group, step", [
    (Topology.boot(4), (0, 1), (0, 1)),
    (Topology.boot(4), (0, 1, 2, 3), (0, 1)),
    (Topology.boot(4).merged((0, 1)), (0, 1, 2, 3), (2, 3)),
    (Topology.boot(4).merged((0, 1)).merged((2, 3)), (0, 1, 2, 3), (0, 1, 2, 3)),
    (Topology.boot(4).merged((2, 3)), (2, 3), None),
])
def test_next_merge_step(topo, group, step):
    assert next_merge_step(topo, group) == step


def test_next_merge_step_refuses_a_group_inside_a_larger_instance():
    topo = Topology.boot(4).merged((0, 1)).merged((2, 3)).merged((0, 1, 2, 3))
    assert next_merge_step(topo, (0, 1, 2, 3)) is None
    with pytest.raises(ValueError, match="larger than the group"):
        next_merge_step(topo, (2, 3))


def test_ledger_counts_dispatches_newer_than_the_snapshot():
    topo = Topology.boot(2)
    ledger = DispatchLedger()
    loads = {0: RankLoad(running=1, total_tokens=100, timestamp=10.0)}
    ledger.record(0, 50, long=False, t=9.0)  # already in the snapshot
    ledger.record(0, 70, long=False, t=11.0)
    ledger.update(topo, loads)
    inst = topo.instance_of(0)
    assert ledger.load(inst, topo, loads) == (170, 2, 0, 1)  # the newer one has not started
    loads = {0: RankLoad(running=0, total_tokens=0, timestamp=12.0)}
    ledger.update(topo, loads)
    assert len(ledger) == 0 and ledger.idle(inst, topo, loads)


def test_ledger_keeps_long_requests_until_an_idle_snapshot_after_them():
    topo = Topology.boot(2).merged((0, 1))
    inst = topo.instance_of(0)
    ledger = DispatchLedger()
    ledger.record(0, 1500, long=True, t=10.0)
    busy = {r: RankLoad(running=1, total_tokens=600, timestamp=11.0) for r in (0, 1)}
    ledger.update(topo, busy)
    assert ledger.load(inst, topo, busy) == (1500, 1, 1, 0)  # its full need counts
    early_idle = {r: RankLoad(timestamp=10.0 + SETTLE_S / 2) for r in (0, 1)}
    ledger.update(topo, early_idle)  # may predate the request's arrival
    assert not ledger.idle(inst, topo, early_idle)
    idle = {r: RankLoad(timestamp=10.0 + SETTLE_S + 0.1) for r in (0, 1)}
    ledger.update(topo, idle)
    assert ledger.idle(inst, topo, idle) and ledger.load(inst, topo, idle).long_running == 0
