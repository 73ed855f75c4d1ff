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
