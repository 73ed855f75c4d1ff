"""Which running requests a merged instance retracts for a long one (core/preemption) and
the queue order that keeps long requests first (switch/admission)."""
from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given
from hypothesis import strategies as st

from gyges.core.preemption import Running, plan_retraction
from gyges.switch.admission import LONG, long_requests_first


def test_nothing_is_retracted_when_the_long_request_fits() -> None:
    assert plan_retraction(0, [Running(0, 500, 100, 3)]) == []
    assert plan_retraction(-10, []) == []


def test_the_fewest_output_tokens_go_first_and_no_more_than_needed() -> None:
    running = [Running(0, 600, 100, 50), Running(1, 600, 100, 5), Running(2, 600, 100, 20)]
    assert plan_retraction(650, running) == [1]
    assert plan_retraction(701, running) == [1, 2]


def test_kept_requests_are_never_retracted_and_too_little_means_none() -> None:
    running = [Running(0, 3000, 0, 1, keep=True), Running(1, 200, 50, 9)]
    assert plan_retraction(250, running) == [1]
    assert plan_retraction(251, running) is None


def test_ties_retract_the_latest_in_the_batch_first() -> None:
    running = [Running(i, 100, 0, 7) for i in range(4)]
    assert plan_retraction(150, running) == [2, 3]


def test_a_request_is_retracted_at_most_max_retractions_times() -> None:
    running = [Running(0, 300, 0, 1, retracted=1), Running(1, 300, 0, 40)]
    assert plan_retraction(300, running) == [1]
    assert plan_retraction(301, running) is None  # the once-retracted one is kept
    assert plan_retraction(301, running, max_retractions=2) == [0, 1]
    assert plan_retraction(1, running, max_retractions=0) is None  # never retract


@given(st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 500), st.integers(0, 300),
                          st.booleans(), st.integers(0, 2)), max_size=12),
       st.integers(-100, 20000), st.integers(0, 3))
def test_a_plan_frees_enough_retracts_only_short_and_is_minimal(
        rows: list[tuple[int, int, int, bool, int]], shortfall: int, bound: int) -> None:
    running = [Running(i, h, r, p, keep, n) for i, (h, r, p, keep, n) in enumerate(rows)]
    plan = plan_retraction(shortfall, running, bound)
    short = [r for r in running if not r.keep and r.retracted < bound]
    if plan is None:
        assert sum(r.held + r.reserved for r in short) < shortfall
        return
    chosen = [running[i] for i in plan]
    assert all(not r.keep and r.retracted < bound for r in chosen)
    freed = sum(r.held + r.reserved for r in chosen)
    assert freed >= shortfall or plan == []
    if chosen:  # the last one added was needed
        order = sorted(chosen, key=lambda r: (r.progress, -r.index))
        assert freed - (order[-1].held + order[-1].reserved) < shortfall


def test_long_requests_go_first_in_order_and_the_rest_keep_theirs() -> None:
    reqs = [SimpleNamespace(rid=str(i)) for i in range(5)]
    for i in (1, 3):
        setattr(reqs[i], LONG, True)
    queue = list(reqs)
    long_requests_first(queue)
    assert [r.rid for r in queue] == ["1", "3", "0", "2", "4"]
    plain = [SimpleNamespace(rid=str(i)) for i in range(3)]
    same = list(plain)
    long_requests_first(same)
    assert same == plain
