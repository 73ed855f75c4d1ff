"""A request's state beyond its KV, carried across a merge or split.

Most of a request pickles with it (sampling parameters, stop strings and regexes, logit
bias, the serialised custom logit processor, logprob settings, ``sampling_seed``, its
output so far). Three things do not, and are rebuilt by the scheduler that installs it:

- **the grammar** (xgrammar's matcher is native state): :func:`detach` drops it and
  :func:`reattach` compiles the same spec through SGLang's grammar manager (its cache
  first), then advances it by every output token, exactly as the request's own scheduler
  did (SGLang accepts each sampled token, the prefill's included). The vocab mask is
  computed from the matcher at every step, so it is the same as if nothing had happened.
- **the request's own references** (``req.tokenizer``; a custom logit processor's
  ``custom_params["__req__"]``, a weak proxy): dropped and set again on the receiver.
- **the penalizers' accumulated state** (frequency, presence and repetition penalties,
  ``min_new_tokens``): it lives in the batch, and every transformation rebuilds the
  batch. :func:`replay_penalties` feeds each request's output tokens through SGLang's own
  penalizers again, in the order and with the arithmetic a decode step uses, so the
  state is bit-identical to the one the old batch held.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any

import torch

GRAMMAR_COMPILE_TIMEOUT_S = 30.0  # a grammar the sender had compiled compiles here too
REQ_PARAM = "__req__"


def detach(req: Any) -> Any:
    """A shallow copy of ``req`` that pickles: no native grammar, no back references."""
    c = copy.copy(req)
    c.gyges_had_grammar = getattr(req, "grammar", None) is not None
    c.grammar = None
    c.tokenizer = None
    sp = req.sampling_params
    params = getattr(sp, "custom_params", None)
    if isinstance(params, dict) and REQ_PARAM in params:
        c.sampling_params = copy.copy(sp)
        c.sampling_params.custom_params = {k: v for k, v in params.items()
                                           if k != REQ_PARAM}
    return c


def reattach(s: Any, req: Any) -> None:
    """Give a request received from a peer what :func:`detach` took (on scheduler ``s``).
    Raises if its grammar cannot be rebuilt; nothing has changed on ``s`` then."""
    req.tokenizer = s.tokenizer
    sp = req.sampling_params
    if getattr(req, "custom_logit_processor", None) and isinstance(
            getattr(sp, "custom_params", None), dict):
        sp.custom_params = sp.custom_params | {REQ_PARAM: weakref.proxy(req)}
    if getattr(req, "gyges_had_grammar", False):
        _rebuild_grammar(s, req)
    req.gyges_had_grammar = False


def _rebuild_grammar(s: Any, req: Any) -> None:
    gm = s.grammar_manager
    req.grammar = None
    queued = gm.process_req_with_grammar(req)
    if queued:  # not in this scheduler's grammar cache yet: compile it now
        gm.grammar_queue = [q for q in gm.grammar_queue if q is not req]
        future, key = req.grammar, req.grammar_key
        req.grammar = future.result(timeout=GRAMMAR_COMPILE_TIMEOUT_S)
        gm.grammar_backend.set_cache(key, req.grammar.copy())
        gm._apply_request_reasoning_config(req)
    grammar = req.grammar
    if grammar is None or type(grammar).__name__ == "InvalidGrammarObject" or req.finished():
        raise RuntimeError(f"request {req.rid}: its grammar did not compile here "
                           f"({getattr(grammar, 'error_message', grammar)})")
    for token in req.output_ids:
        grammar.accept_token(int(token))
    grammar.finished = False


def replay_penalties(batch: Any) -> int:
    """Rebuild the penalizers' state of a freshly built decode ``batch`` from its requests'
    output tokens. Returns the number of tokens replayed (0 when no penalty is on).

    A decode step cumulates a request's latest output token before its forward
    (``ScheduleBatch.cumulate_penalty_output_tokens``), so a request about to decode with
    n outputs has had its first n-1 cumulated; those are replayed, one step at a time, with
    rows that are done with theirs left untouched."""
    info = getattr(batch, "sampling_info", None)
    orch = getattr(info, "penalizer_orchestrator", None)
    if orch is None:
        return 0
    penalizers = [p for p in orch.penalizers.values() if p.is_prepared()]
    if not penalizers:
        return 0
    reqs = batch.reqs
    counts = [max(len(r.output_ids) - 1, 0) for r in reqs]
    device = batch.device
    replayed = 0
    for t in range(max(counts, default=0)):
        idle = torch.tensor([i for i, n in enumerate(counts) if n <= t], dtype=torch.long,
                            device=device)
        ids = torch.tensor([r.output_ids[t] if n > t else 0 for r, n in zip(reqs, counts,
                                                                           strict=True)],
                           dtype=torch.int64, device=device)
        saved = [(p, name, value[idle].clone()) for p in penalizers
                 for name, value in _row_state(p, len(reqs))] if idle.numel() else []
        orch.cumulate_output_tokens(ids)
        for p, name, value in saved:
            getattr(p, name)[idle] = value
        replayed += len(reqs) - idle.numel()
    return replayed


def _row_state(penalizer: Any, rows: int) -> list[tuple[str, torch.Tensor]]:
    """The per-request tensors of a penalizer (first dimension = batch rows)."""
    return [(name, v) for name, v in vars(penalizer).items()
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows]
