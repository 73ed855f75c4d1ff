"""A split leaves no request in a half that cannot serve it, and a queue that stops moving
is reported (gyges.switch.capacity.oversized, gyges.switch.stall_watch)."""
from __future__ import annotations

from types import SimpleNamespace as NS

from gyges.switch.capacity import capacity_at, oversized
from gyges.switch.stall_watch import StallWatch


def _req(rid: str, prompt: int, new: int | None) -> NS:
    return NS(rid=rid, origin_input_ids=list(range(prompt)), output_ids=[],
              sampling_params=NS(max_new_tokens=new))


def _scheduler(running=(), waiting=(), slots=512, page=1, last=None, chunked=None) -> NS:
    pool = NS(gyges_kv_layout="head_major", gyges_k_layout=NS(slots_per_replica=slots),
              page_size=page)
    return NS(tp_worker=NS(model_runner=NS(token_to_kv_pool=pool)),
              running_batch=NS(reqs=list(running), batch_is_full=False),
              waiting_queue=list(waiting), last_batch=last, chunked_req=chunked)


def test_capacity_of_a_half():
    pool = _scheduler().tp_worker.model_runner.token_to_kv_pool
    assert capacity_at(pool, 2) == 1023


def test_a_request_that_fits_a_half_does_not_refuse():
    # TP2 half of 512-slot replicas: 1023 slots, 1015 usable (slack 8)
    s = _scheduler(running=[_req("a", 900, 100)], waiting=[_req("b", 1000, 15)])
    assert oversized(s, 2) is None


def test_a_waiting_request_too_big_for_a_half_refuses():
    s = _scheduler(waiting=[_req("a", 10, 4), _req("big", 1500, 4)])
    why = oversized(s, 2)
    assert why is not None and "big" in why and "1504" in why and "1015" in why


def test_a_running_request_counts_its_whole_budget():
    # 600 tokens now, but max_new_tokens takes it past a TP1 replica (504 usable)
    s = _scheduler(running=[_req("r", 300, 300)])
    assert "r needs 600" in oversized(s, 1)


def test_unset_max_new_tokens_counts_the_default():
    s = _scheduler(waiting=[_req("d", 1000, None)])  # 1000 + 128 > 1015
    assert "d needs 1128" in oversized(s, 2)


def test_the_last_extend_batch_and_a_chunked_prefill_count():
    # neither is in the running batch or the queue when the prepare step runs; the settle
    # folds the one in and parks the other in a half's queue
    extend = NS(reqs=[_req("fresh", 1200, 4)], forward_mode=NS(is_extend=lambda: True))
    extend.reqs[0].finished = lambda: False
    assert "fresh needs 1204" in oversized(_scheduler(last=extend), 2)
    assert "doc needs 3000" in oversized(_scheduler(chunked=_req("doc", 2990, 10)), 2)


def test_stall_watch_reports_a_queue_that_does_not_move_once():
    w = StallWatch(rank=0, after_s=10)
    s = _scheduler(waiting=[_req("a", 5, 4)])
    s.token_to_kv_pool_allocator = NS(available_size=lambda: 15)
    assert w.observe(s, now=0) is None
    assert w.observe(s, now=9) is None
    why = w.observe(s, now=11)
    assert why is not None and why["head"][0]["rid"] == "a" and why["kv_available"] == 15
    assert why["kv_evictable"] == "AttributeError"  # a probe that fails is named, not raised
    assert w.observe(s, now=30) is None  # once per stall


def test_stall_watch_quiet_while_the_queue_moves_or_requests_run():
    w = StallWatch(rank=0, after_s=10)
    s = _scheduler(waiting=[_req("a", 5, 4)])
    w.observe(s, now=0)
    s.waiting_queue = [_req("b", 5, 4)]
    assert w.observe(s, now=11) is None  # a new head: the queue moved
    s.running_batch.reqs = [_req("c", 5, 4)]
    assert w.observe(s, now=30) is None  # something runs
    s.running_batch.reqs = []
    assert w.observe(s, now=31) is None  # the clock restarts
    assert w.observe(s, now=42) is not None
