"""switch/admission.make_room on stand-ins for SGLang's scheduler objects: which running
requests a merged instance retracts for a long waiting one, and when it retracts none.
(The live path, through SGLang's own retraction, is tests/server/test_auto_merge.py.)"""
from __future__ import annotations

from types import SimpleNamespace

from gyges.switch.admission import is_long, make_room


class Req(SimpleNamespace):
    def __init__(self, rid: str, prompt: int, new: int, out: int = 0, **params: float) -> None:
        sampling = SimpleNamespace(max_new_tokens=new, ignore_eos=False, frequency_penalty=0.0,
                                   presence_penalty=0.0, repetition_penalty=1.0,
                                   min_new_tokens=0)
        for k, v in params.items():
            setattr(sampling, k, v)
        super().__init__(rid=rid, origin_input_ids=[1] * prompt, output_ids=[2] * out,
                         sampling_params=sampling,
                         kv=SimpleNamespace(kv_allocated_len=prompt + out),
                         return_logprob=False, custom_logit_processor=None)

    def finished(self) -> bool:
        return False


class Batch:
    def __init__(self, reqs: list[Req]) -> None:
        self.reqs, self.released, self.batch_is_full = list(reqs), [], True

    def release_req(self, i: int, _remaining: int) -> None:
        self.released.append(self.reqs[i].rid)

    def filter_batch(self, keep_indices: list[int]) -> None:
        self.reqs = [self.reqs[i] for i in keep_indices]


def _scheduler(waiting: list[Req], free: int, max_queued: int | None = None):
    s = SimpleNamespace(waiting_queue=list(waiting), chunked_req=None, page_size=1,
                        new_token_ratio_tracker=SimpleNamespace(current=0.5),
                        token_to_kv_pool_allocator=SimpleNamespace(available_size=lambda: free),
                        tree_cache=SimpleNamespace(evictable_size=lambda: 0),
                        max_queued_requests=max_queued)
    s._add_request_to_queue = lambda req, is_retracted=False: s.waiting_queue.append(req)
    return s


def test_short_requests_are_retracted_until_the_long_one_fits_and_queue_behind_it() -> None:
    shorts = [Req("a", 600, 200, out=100), Req("b", 600, 200, out=20)]
    waiting = [Req("w", 600, 200), Req("long", 1500, 8)]
    s, batch = _scheduler(waiting, free=700), Batch(shorts)
    # need 1509; free 700 - reserved (100 + 180) * 0.5 = 560; b (fewest output tokens)
    # frees 620 + 90, not enough, then a 700 + 50
    assert make_room(s, batch, replica_usable=1016) == ["a", "b"] == batch.released
    assert [r.rid for r in s.waiting_queue] == ["long", "w", "a", "b"]
    assert is_long(s.waiting_queue[0]) and batch.reqs == [] and not batch.batch_is_full


def test_no_retraction_when_it_would_not_suffice_or_would_overflow_the_queue() -> None:
    penalised = Req("p", 600, 200, out=10, frequency_penalty=0.5)
    plain = Req("q", 600, 200, out=10)
    s, batch = _scheduler([Req("long", 1500, 8)], free=300), Batch([penalised, plain])
    assert make_room(s, batch, replica_usable=1016) == []  # only q may go: 300 + 705 < 1509
    assert batch.released == []
    s, batch = _scheduler([Req("long", 1500, 8)], free=900, max_queued=1), Batch([plain])
    assert make_room(s, batch, replica_usable=1016) == []  # q back in the queue: 2 > 1
    s, batch = _scheduler([Req("long", 1500, 8)], free=900), Batch([plain])
    assert make_room(s, batch, replica_usable=1016) == ["q"]


def test_a_short_head_or_a_tp1_sized_request_changes_nothing() -> None:
    s, batch = _scheduler([Req("w", 600, 200)], free=0), Batch([Req("a", 600, 200, out=5)])
    assert make_room(s, batch, replica_usable=1016) == [] and batch.released == []
