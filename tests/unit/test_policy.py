"""Algorithm 1 decisions on crafted hosts, and where the RR/LLF baselines choose worse."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.policy import (
    Dispatch,
    HostView,
    InstanceView,
    Merge,
    Reject,
    Wait,
    aligned_groups,
    decide,
    smallest_degree,
    splits_due,
)

CAP = 1000


def host(used, merged=(), reserved=(), max_tp=4):
    """TP1 instances with ``used`` tokens, except the aligned groups listed in ``merged``."""
    insts, r = [], 0
    groups = {g[0]: g for g in merged}
    while r < len(used):
        g = groups.get(r, (r,))
        insts.append(InstanceView(tuple(g), CAP * len(g), sum(used[x] for x in g)))
        r += len(g)
    return HostView(tuple(insts), CAP, max_tp, frozenset(reserved))


def test_aligned_groups_and_degrees():
    assert aligned_groups(4, 2) == [(0, 1), (2, 3)]
    assert aligned_groups(4, 4) == [(0, 1, 2, 3)]
    h = host([0] * 4)
    assert [smallest_degree(h, n) for n in (1, 1000, 1001, 2000, 2001, 4000, 4001)] == \
        [1, 1, 2, 2, 4, 4, None]


def test_short_goes_to_least_loaded_unreserved_tp1():
    assert decide(host([500, 100, 50, 900], reserved={2, 3}), 100) == Dispatch(1)


def test_short_goes_where_fewest_requests_wait_then_least_kv() -> None:
    """KV load alone herds requests onto the replica that is prefilling the last one."""
    insts = (InstanceView((0,), CAP, 100, 2, waiting=1), InstanceView((1,), CAP, 600, 3),
             InstanceView((2,), CAP, 400, 3))
    h = HostView(insts, CAP, 4)
    assert decide(h, 100) == Dispatch(2)  # 0 has one waiting; 2 beats 1 on KV
    assert decide(h, 100, "llf") == Dispatch(0)  # the baseline stays KV-only
    assert decide(h, 700) == Dispatch(0)  # only 0 has room for it


def test_short_prefers_tp1_with_room_over_merged():
    h = host([0, 0, 950, 0], merged=[(0, 1)])
    assert decide(h, 100) == Dispatch(3)


def test_long_uses_existing_merged_instance_with_room():
    h = host([10, 10, 0, 0], merged=[(0, 1)])
    assert decide(h, 1500) == Dispatch(0)


def test_long_merges_cheapest_group():
    # (0,1) holds 1000 tokens of running KV, (2,3) only 600: merging (2,3) moves less.
    h = host([100, 900, 300, 300])
    assert decide(h, 1500) == Merge((2, 3))


def test_llf_and_round_robin_pick_the_expensive_group():
    h = host([100, 900, 300, 300])
    assert decide(h, 1500, "llf") == Merge((0, 1))  # follows the least-loaded rank 0
    assert decide(h, 1500, "round_robin", counter=0) == Merge((0, 1))
    assert h.group_load((0, 1)) > h.group_load((2, 3))


def test_round_robin_sends_short_requests_into_a_reserved_group():
    h = host([0, 0, 0, 0], reserved={0, 1})
    assert decide(h, 10, "round_robin", counter=0) == Dispatch(0)  # disturbs the merge
    assert decide(h, 10, "gyges") in (Dispatch(2), Dispatch(3))


def test_hierarchical_merge_from_tp2_to_tp4():
    h = host([100, 100, 0, 0], merged=[(0, 1), (2, 3)])
    assert decide(h, 3000) == Merge((0, 1, 2, 3))


def test_reserved_group_makes_next_long_request_wait_or_merge_elsewhere():
    h = host([0, 0, 0, 0], reserved={0, 1})
    assert decide(h, 1500) == Merge((2, 3))
    h2 = host([0, 0, 0, 0], reserved={0, 1, 2, 3})
    assert isinstance(decide(h2, 1500), Wait)


def test_too_large_is_rejected_at_once():
    d = decide(host([0] * 4), 4001)
    assert isinstance(d, Reject) and "4001" in d.reason and "4000" in d.reason


def test_busy_large_instance_gets_the_queue():
    h = HostView((InstanceView((0, 1, 2, 3), 4000, 3900),), CAP, 4)
    assert decide(h, 2500) == Dispatch(0)


def test_splits_respect_hold_down_and_long_requests():
    h = host([0, 0, 0, 0], merged=[(0, 1), (2, 3)])
    seen = {0: 100.0, 2: 90.0}
    due = splits_due(h, seen, now=104.0, hold_down_s=5.0, long_running={})
    assert [i.leader for i in due] == [2]
    assert splits_due(h, seen, now=200.0, hold_down_s=5.0, long_running={0: 1}) == [h.instances[1]]


@settings(max_examples=150, deadline=None)
@given(used=st.lists(st.integers(0, CAP), min_size=4, max_size=4),
       need=st.integers(1, 5000), policy=st.sampled_from(["gyges", "llf", "round_robin"]),
       counter=st.integers(0, 7))
def test_decisions_are_always_valid(used, need, policy, counter):
    h = host(used)
    d = decide(h, need, policy, counter)
    k = smallest_degree(h, need)
    if k is None:
        assert isinstance(d, Reject)
    elif k == 1:
        assert isinstance(d, Dispatch) and d.leader in h.instances[d.leader].ranks
    else:
        assert isinstance(d, Merge) and len(d.ranks) == k and d.ranks[0] % k == 0
        if policy == "gyges":
            assert h.group_load(d.ranks) == min(h.group_load(g) for g in aligned_groups(4, k))


def test_llf_sends_short_requests_into_a_reserved_group():
    # Ranks 0, 1 are reserved for a pending merge and idle: LLF fills them (delaying the
    # merge, which must drain them first); gyges keeps them free.
    h = host([0, 0, 300, 400], reserved={0, 1})
    assert decide(h, 10, "llf") == Dispatch(0)
    assert decide(h, 10, "gyges") == Dispatch(2)


def test_round_robin_ignores_load_and_room():
    h = host([990, 0, 0, 0])  # rank 0 has 10 free slots
    assert decide(h, 200, "round_robin", counter=0) == Dispatch(0)  # queues behind 990
    assert decide(h, 200, "gyges") in (Dispatch(1), Dispatch(2), Dispatch(3))


def test_short_request_too_big_for_every_tp1_goes_to_a_merged_instance_with_room():
    h = host([0, 0, 900, 950], merged=[(0, 1)])
    assert decide(h, 500, "gyges") == Dispatch(0)  # TP1s have 100 and 50 free
    assert decide(h, 500, "llf") == Dispatch(2)  # LLF only looks at TP1 instances


def test_long_request_queues_only_on_instances_that_can_hold_it():
    # The only TP2 instance is busy and its members report less KV than 2 x CAP.
    h = HostView((InstanceView((0, 1), 1500, 1400),), CAP, 2)
    assert isinstance(decide(h, 1800), Wait)
    h = HostView((InstanceView((0, 1), 2000, 1900),), CAP, 2)
    assert decide(h, 1800) == Dispatch(0)
