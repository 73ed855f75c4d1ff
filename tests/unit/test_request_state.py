"""The request state a migration rebuilds: penalizer replay is bit-identical to SGLang's own
step-by-step accumulation; detached requests pickle and get their references back."""
from __future__ import annotations

import pickle
import random
import weakref
from types import SimpleNamespace

import torch
from sglang.srt.sampling import penaltylib
from sglang.srt.sampling.sampling_params import SamplingParams

from gyges.switch import request_state

VOCAB = 97
TOKENIZER = SimpleNamespace(additional_stop_token_ids=None, eos_token_id=3)


def _req(rng: random.Random, n_out: int, **sp) -> SimpleNamespace:
    return SimpleNamespace(sampling_params=SamplingParams(**sp), eos_token_ids={4},
                           tokenizer=TOKENIZER, origin_input_ids=[1, 2],
                           output_ids=[rng.randrange(VOCAB) for _ in range(n_out)])


class _Batch:
    def __init__(self, reqs):
        self.reqs, self.device = reqs, "cpu"


def _orchestrator(reqs):
    batch = _Batch(reqs)
    orch = penaltylib.BatchedPenalizerOrchestrator(
        vocab_size=VOCAB, batch=batch,
        penalizers={penaltylib.BatchedFrequencyPenalizer,
                    penaltylib.BatchedMinNewTokensPenalizer,
                    penaltylib.BatchedPresencePenalizer,
                    penaltylib.BatchedRepetitionPenalizer})
    batch.sampling_info = SimpleNamespace(penalizer_orchestrator=orch)
    return batch, orch


def test_replay_equals_each_requests_own_step_by_step_state():
    rng = random.Random(3)
    reqs = [_req(rng, 40, frequency_penalty=0.1, presence_penalty=0.3),
            _req(rng, 1, repetition_penalty=1.7),
            _req(rng, 17, min_new_tokens=30, frequency_penalty=0.7),
            _req(rng, 0),
            _req(rng, 25, repetition_penalty=1.1, presence_penalty=0.2)]
    batch, orch = _orchestrator(reqs)
    replayed = request_state.replay_penalties(batch)
    assert replayed == sum(max(len(r.output_ids) - 1, 0) for r in reqs)
    logits = torch.randn(len(reqs), VOCAB)
    got = logits.clone()
    orch.apply(got)
    for i, req in enumerate(reqs):  # SGLang's own path: one request, one token per step
        own_batch, own = _orchestrator([req])
        for t in req.output_ids[:-1]:
            own.cumulate_output_tokens(torch.tensor([t]))
        want = logits[i:i + 1].clone()
        own.apply(want)
        del own_batch
        assert torch.equal(got[i:i + 1], want), f"request {i}"


def test_captured_rows_move_whatever_history_made_them():
    """Under SGLang's overlap scheduler the state is not a function of the outputs (the
    first decode cumulates the prompt's last token, a token can be cumulated twice): the
    rows captured from the old batch, restored into a rebuilt batch in another order and
    beside a request that was not there, give the old batch's penalized logits."""
    rng = random.Random(7)
    reqs = [_req(rng, 30, frequency_penalty=0.7),
            _req(rng, 12, repetition_penalty=1.3, presence_penalty=0.4),
            _req(rng, 5, min_new_tokens=20)]
    old_batch, old = _orchestrator(reqs)
    for step in range(40):  # an arbitrary history, as an overlapped schedule makes one
        old.cumulate_output_tokens(torch.tensor([rng.randrange(VOCAB) for _ in reqs]))
        if step % 7 == 0:
            old.cumulate_output_tokens(torch.tensor([r.origin_input_ids[-1] for r in reqs]))
    logits = torch.randn(len(reqs), VOCAB)
    want = logits.clone()
    old.apply(want)
    assert request_state.capture_penalties(old_batch) == len(reqs)
    blob = pickle.dumps([r.gyges_penalty_rows for r in reqs])
    for r, rows in zip(reqs, pickle.loads(blob), strict=True):  # they cross processes
        r.gyges_penalty_rows = rows
    newcomer = _req(rng, 3, frequency_penalty=0.2)
    order = [2, 0, 1]
    new_batch, new = _orchestrator([newcomer, *[reqs[i] for i in order]])
    request_state.replay_penalties(new_batch)
    assert request_state.restore_penalties(new_batch) > 0
    got = torch.cat([torch.zeros(1, VOCAB), logits[order]])
    new.apply(got)
    assert torch.equal(got[1:], want[order])
    assert all(getattr(r, request_state.PENALTY_ROWS) is None for r in reqs)


def test_replay_is_a_no_op_without_penalties():
    rng = random.Random(1)
    batch, _ = _orchestrator([_req(rng, 9), _req(rng, 3)])
    assert request_state.replay_penalties(batch) == 0


class _Req:
    def __init__(self):
        self.rid = "r1"
        self.sampling_params = SamplingParams(custom_params={"banned": [1]})
        self.custom_logit_processor = "serialised"
        self.sampling_params.custom_params["__req__"] = weakref.proxy(self)
        self.tokenizer = TOKENIZER
        self.grammar = None
        self.output_ids = [5, 6]


def test_detached_request_pickles_and_gets_its_references_back():
    req = _req_keep = _Req()
    copy = request_state.detach(req)
    assert "__req__" in req.sampling_params.custom_params  # the original is untouched
    assert req.tokenizer is TOKENIZER
    back = pickle.loads(pickle.dumps(copy))
    assert back.tokenizer is None and "__req__" not in back.sampling_params.custom_params
    sched = SimpleNamespace(tokenizer=TOKENIZER)
    request_state.reattach(sched, back)
    assert back.tokenizer is TOKENIZER
    assert back.sampling_params.custom_params["__req__"].output_ids == [5, 6]
    assert back.sampling_params.custom_params["banned"] == [1]
    del _req_keep


def test_deferred_lag_makes_the_next_cumulation_stock_overlaps():
    """The settled request's next cumulation uses its noted lag token (once); a request
    without one cumulates its newest output as SGLang would."""
    rng = random.Random(11)
    settled, other = _req(rng, 6, frequency_penalty=0.5), _req(rng, 4, frequency_penalty=0.5)
    request_state.note_penalty_lag([settled])  # before its in-flight token is appended
    lag = settled.output_ids[-1]
    settled.output_ids.append(rng.randrange(VOCAB))
    batch, orch = _orchestrator([other, settled])
    assert request_state.defer_penalty_lag(batch) == 1
    newest = torch.tensor([r.output_ids[-1] for r in batch.reqs])
    orch.cumulate_output_tokens(newest)
    orch.cumulate_output_tokens(newest)  # the second one is SGLang's own again
    want_batch, want = _orchestrator([other, settled])
    want.cumulate_output_tokens(torch.tensor([other.output_ids[-1], lag]))
    want.cumulate_output_tokens(newest)
    logits = torch.randn(2, VOCAB)
    got, expected = logits.clone(), logits.clone()
    orch.apply(got)
    want.apply(expected)
    assert torch.equal(got, expected)
    assert getattr(settled, request_state.PENALTY_LAG) is None
