"""Router placement policies as pure functions over crafted /gyges/status snapshots."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.router.policy import (
    HostStatus,
    HostView,
    InstanceStatus,
    is_long,
    merge_costs,
    merge_degree,
    place,
    place_gyges,
    place_least_load,
    place_round_robin,
)

CAP = 1000  # tokens per rank (one TP1 replica)


def inst(
    ranks: tuple[int, ...], used: int = 0, running: int = 0, waiting: int = 0
) -> InstanceStatus:
    tp = len(ranks)
    return InstanceStatus(ranks, tp, ranks[0], CAP * tp, used, running, waiting)


def host(*instances: InstanceStatus, max_tp: int | None = None, max_req: int | None = None):
    dp = sum(i.tp for i in instances)
    max_tp = max_tp or dp
    return HostStatus("head_major", "padded", max_tp, dp, max_req or CAP * max_tp, instances)


def tp1_host(dp: int, used: tuple[int, ...] | None = None, **kw) -> HostStatus:
    used = used or (0,) * dp
    return host(*(inst((r,), used[r]) for r in range(dp)), **kw)


def view(wid: str, status: HostStatus | None, **kw) -> HostView:
    return HostView(wid, status, **kw)


def test_tp1_capacity_and_long_for_any_topology():
    merged = host(inst((0, 1), used=500), inst((2,)), inst((3,)))
    assert merged.tp1_capacity == CAP and merged.has_merged
    only_merged = host(inst((0, 1, 2, 3)))
    assert only_merged.tp1_capacity == CAP
    assert not is_long(CAP, merged) and is_long(CAP + 1, merged)
    assert not is_long(10**9, None)  # unknown (stock) host: never "long"


def test_merge_degree():
    s = tp1_host(4)
    assert merge_degree(900, s) == 1
    assert merge_degree(1500, s) == 2
    assert merge_degree(3500, s) == 4
    assert merge_degree(4001, s) is None
    assert merge_degree(3500, tp1_host(4, max_tp=2)) is None


def test_merge_costs_skip_groups_already_at_degree():
    s = host(inst((0, 1), used=700), inst((2,), used=100), inst((3,), used=50))
    assert merge_costs(2, s) == [150]  # group {0,1} is already TP2
    assert merge_costs(4, s) == [850]
    assert merge_costs(2, tp1_host(4, used=(300, 0, 50, 50))) == [100, 300]


def test_short_goes_to_most_free_tp1_capacity():
    a, b = tp1_host(2, used=(600, 600)), tp1_host(2, used=(100, 0))
    p = place_gyges(200, [view("a", a), view("b", b)])
    assert p is not None and (p.worker_id, p.long, p.reason) == ("b", False, "tp1-free")


def test_short_avoids_host_with_merged_instance():
    a = host(inst((0, 1), used=1500), inst((2,)), inst((3,)))
    b = tp1_host(4, used=(400, 400, 400, 400))
    assert place_gyges(100, [view("a", a), view("b", b)]).worker_id == "b"


def test_pending_short_requests_count_against_snapshot():
    a, b = tp1_host(4), tp1_host(4, used=(250,) * 4)
    assert place_gyges(100, [view("a", a), view("b", b)]).worker_id == "a"
    busy = view("a", a, pending_short_tokens=1500, outstanding_requests=10)
    assert place_gyges(100, [busy, view("b", b)]).worker_id == "b"


def test_tp1_capacity_when_merged_instances_grew_their_kv():
    """Members that grew their KV into released MLP memory hold more than k replicas: a
    replica is then read from a TP1 instance, or from max request / max TP."""
    grown = InstanceStatus((0, 1, 2, 3), 4, 0, 10 * CAP, 0, 0, 0)
    alone = host(grown, max_tp=4, max_req=4 * CAP)
    assert alone.tp1_capacity == CAP
    assert is_long(1500, alone)  # long there too: it does not draw every long request
    mixed = host(InstanceStatus((0, 1), 2, 0, 5 * CAP, 0, 0, 0), inst((2,)), inst((3,)))
    assert mixed.tp1_capacity == CAP


def test_long_goes_where_merged_instance_has_room():
    a = host(inst((0, 1), used=300), inst((2,), used=900), inst((3,), used=900))
    b = tp1_host(4)
    p = place_gyges(1500, [view("b", b), view("a", a)])
    assert (p.worker_id, p.long, p.reason) == ("a", True, "merged-room")
    # Room already promised to a long request sent after the snapshot does not count.
    p = place_gyges(1500, [view("b", b), view("a", a, pending_long_tokens=1200)])
    assert p.worker_id == "b" and p.reason == "merge-tp2-cost0"


def test_requests_finished_after_the_snapshot_free_their_room():
    a = host(inst((0, 1), used=1500))  # stale: the long request has finished since
    b = tp1_host(2)
    assert place_gyges(1500, [view("a", a), view("b", b)]).worker_id == "b"
    p = place_gyges(1500, [view("a", a, released_long_tokens=1500), view("b", b)])
    assert (p.worker_id, p.reason) == ("a", "merged-room")
    full, half = tp1_host(2, used=(900, 900)), tp1_host(2, used=(500, 500))
    assert place_gyges(100, [view("f", full), view("h", half)]).worker_id == "h"
    assert (
        place_gyges(100, [view("f", full, released_short_tokens=1500), view("h", half)]).worker_id
        == "f"
    )


def test_long_merges_where_cheapest():
    a = tp1_host(4, used=(300, 200, 300, 250))
    b = tp1_host(4, used=(50, 0, 400, 400))
    p = place_gyges(1800, [view("a", a), view("b", b)])
    assert (p.worker_id, p.reason) == ("b", "merge-tp2-cost50")


def test_long_needing_tp4_counts_nested_instances():
    a = host(inst((0, 1), used=500), *(inst((r,)) for r in range(2, 8)))
    assert merge_costs(4, a) == [0, 500]
    p = place_gyges(3000, [view("a", a)])
    assert (p.worker_id, p.long, p.reason) == ("a", True, "merge-tp4-cost0")


def test_full_merged_instance_sends_next_long_elsewhere():
    a = host(inst((0, 1), used=1900))  # dp2, its only TP2 group is merged and full
    b = tp1_host(2, used=(200, 200))
    assert place_gyges(1500, [view("a", a), view("b", b)]).worker_id == "b"


def test_long_waits_where_least_long_work_is_queued():
    a = view("a", host(inst((0, 1), used=1900)), outstanding_long_tokens=3000)
    b = view("b", host(inst((0, 1), used=1900)), outstanding_long_tokens=1900)
    p = place_gyges(1500, [a, b])
    assert (p.worker_id, p.long, p.reason) == ("b", True, "wait-for-merged-room")


def test_equal_merge_cost_prefers_a_host_already_transformed():
    a = host(inst((0, 1), used=1900), inst((2,)), inst((3,)))
    b = tp1_host(4)
    p = place_gyges(1500, [view("b", b), view("a", a)])
    assert (p.worker_id, p.reason) == ("a", "merge-tp2-cost0")


def test_equal_merge_cost_prefers_a_host_that_took_long_requests_lately():
    # a split back after its last long request; its snapshot looks like b's
    a, b = tp1_host(2), tp1_host(2)
    p = place_gyges(1500, [view("b", b), view("a", a, recent_long=True)])
    assert (p.worker_id, p.reason) == ("a", "merge-tp2-cost0")
    cheaper = place_gyges(1500, [view("b", b), view("a", tp1_host(2, (300, 0)),
                                                   recent_long=True)])
    assert cheaper.worker_id == "b"  # cost first: recency only breaks ties


def test_long_requests_join_a_merge_under_way():
    # The router sent long requests to a; its snapshot does not show the merge yet. b is as
    # loaded (load comes first; see test_load_comes_first).
    b = view("b", tp1_host(4), outstanding_requests=1)
    a = view("a", tp1_host(4), outstanding_long_tokens=2500, outstanding_requests=1)
    p = place_gyges(1200, [b, a])  # 2500 + 1200 fit the TP4 instance being formed
    assert (p.worker_id, p.reason) == ("a", "merge-underway-tp4")
    p = place_gyges(1600, [b, a])  # they do not: a fresh merge, on b
    assert (p.worker_id, p.reason) == ("b", "merge-tp2-cost0")
    # Two long requests never share a TP2 instance; on a dp2 host the only group is taken.
    a2 = view("a", tp1_host(2), outstanding_long_tokens=1200, outstanding_requests=1)
    b2 = view("b", tp1_host(2), outstanding_requests=1)
    assert place_gyges(1100, [a2, b2]).worker_id == "b"
    # On a dp4 host the other group is free: equal cost, a is already transforming.
    a4 = view("a", tp1_host(4), outstanding_long_tokens=1200, outstanding_requests=1)
    assert place_gyges(1100, [b, a4]).worker_id == "a"
    # Short requests avoid the group being merged.
    busy_b = view("b", tp1_host(2, used=(300, 300)), outstanding_requests=1)
    assert place_gyges(100, [a2, busy_b]).worker_id == "b"


def test_load_comes_first():
    """Fewest outstanding requests first, for short and long requests alike: gathering long
    requests where a merged instance has room queued their prefills (found with gyges.sim)."""
    merged = host(inst((0, 1), used=300), inst((2,)), inst((3,)))
    a = view("a", merged, outstanding_requests=3)
    b = view("b", tp1_host(4), outstanding_requests=1)
    assert place_gyges(1500, [a, b]).reason == "merge-tp2-cost0"
    assert place_gyges(1500, [a, b]).worker_id == "b"
    assert place_gyges(100, [a, b]).worker_id == "b"
    # Equal load: the merged room wins again, and among shorts the fewest outstanding tokens.
    a = view("a", merged, outstanding_requests=1)
    assert place_gyges(1500, [b, a]).worker_id == "a"
    light = view("b", tp1_host(4), outstanding_requests=1, outstanding_tokens=10)
    heavy = view("a", tp1_host(4), outstanding_requests=1, outstanding_tokens=900)
    assert place_gyges(100, [heavy, light]).worker_id == "b"
    # A host that cannot take the request stays last whatever its load.
    small = view("s", tp1_host(2, max_req=1000))
    big = view("g", tp1_host(4), outstanding_requests=9)
    assert place_gyges(1500, [small, big]).worker_id == "g"


def test_busy_merged_instance_does_not_draw_more_long_requests():
    """A merged instance serving as many requests as it has ranks would queue a new long
    prefill behind theirs: a fresh merge is preferred, on the same host if it can."""
    busy = host(inst((0, 1), used=300, running=2), inst((2,)), inst((3,)))
    p = place_gyges(1500, [view("a", busy)])
    assert (p.worker_id, p.reason) == ("a", "merge-tp2-cost0")
    one = host(inst((0, 1), used=300, running=1), inst((2,)), inst((3,)))
    assert place_gyges(1500, [view("a", one)]).reason == "merged-room"


def test_too_large_for_every_host_goes_to_the_largest():
    a, b = tp1_host(2, max_req=2000), tp1_host(4, max_req=4000)
    p = place_gyges(9000, [view("a", a), view("b", b)])
    assert p.worker_id == "b" and p.reason == "exceeds-max-request"
    assert place_gyges(3000, [view("b", b), view("a", a)]).worker_id == "b"


def test_stock_servers_fall_back_to_least_load():
    hosts = [view("a", None, outstanding_requests=3), view("b", None, outstanding_requests=1)]
    p = place_gyges(5000, hosts)
    assert (p.worker_id, p.long, p.reason) == ("b", False, "least-load")
    mixed = [view("s", None), view("g", tp1_host(2, used=(900, 900)))]
    assert place_gyges(50, mixed).worker_id == "g"


def test_baselines_and_dispatch():
    hosts = [view("a", tp1_host(2), outstanding_requests=2), view("b", None)]
    assert [place_round_robin(1, hosts, c).worker_id for c in range(3)] == ["a", "b", "a"]
    assert place_least_load(1, hosts).worker_id == "b"
    idle = [view("a", None), view("b", None), view("c", None)]
    assert [place_least_load(1, idle, c).worker_id for c in range(4)] == ["a", "b", "c", "a"]
    twins = [view("a", tp1_host(2)), view("b", tp1_host(2))]
    assert [place_gyges(100, twins, c).worker_id for c in range(3)] == ["a", "b", "a"]
    assert [place_gyges(1500, twins, c).worker_id for c in range(3)] == ["a", "a", "a"]
    assert place("round_robin", 5000, hosts, 0).long
    assert place("gyges", 1, []) is None and place_least_load(1, []) is None
    with pytest.raises(ValueError):
        place("random", 1, hosts)


@st.composite
def topologies(draw):
    """A host whose ranks are split into aligned groups of random degrees."""
    max_tp = draw(st.sampled_from([1, 2, 4, 8]))
    dp = max_tp * draw(st.integers(1, 2))
    instances, r = [], 0
    while r < dp:
        k = draw(st.sampled_from([k for k in (1, 2, 4, 8) if k <= max_tp and r % k == 0]))
        used = draw(st.integers(0, CAP * k))
        instances.append(inst(tuple(range(r, r + k)), used))
        r += k
    return host(*instances, max_tp=max_tp)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(topologies(), min_size=1, max_size=4),
    st.integers(1, 9000),
    st.lists(st.integers(0, 3000), min_size=4, max_size=4),
    st.lists(st.integers(0, 3), min_size=4, max_size=4),
)
def test_gyges_placement_properties(statuses, need, loads, queued):
    hosts = [view(str(i), s, outstanding_long_tokens=loads[i], outstanding_requests=queued[i])
             for i, s in enumerate(statuses)]
    p = place_gyges(need, hosts)
    chosen = statuses[int(p.worker_id)]
    assert p.long == is_long(need, chosen)
    assert p == place_gyges(need, hosts)  # deterministic
    fits = [s for s in statuses if need <= s.max_request_tokens]
    if fits:  # never a host that cannot take it while another can; the least loaded of them
        assert need <= chosen.max_request_tokens
        fit_load = [queued[i] for i, s in enumerate(statuses) if need <= s.max_request_tokens]
        assert queued[int(p.worker_id)] == min(fit_load)
    if p.reason == "merged-room":
        assert any(i.tp > 1 and i.free_tokens >= need and i.running + i.waiting < i.tp
                   for i in chosen.instances)
