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
  batch. :func:`capture_penalties` copies each running request's rows of the old batch's
  penalizers onto the request (they pickle with it) and :func:`restore_penalties` writes
  them into the new batch. A copy, not a recomputation: under SGLang's overlap scheduler
  a decode step cumulates the newest token *processed* when it is prepared, which lags the
  sampled tokens by one step or not depending on the schedule (the first decode even
  cumulates the prompt's last token), so the state is not a function of the output
  tokens. :func:`replay_penalties` (the non-overlap arithmetic) remains for a batch
  with nothing captured. The settle before a transformation processes the overlapped step in
  flight, one step earlier than SGLang's loop would: for its requests the next decode
  would have cumulated the token before the one it just appended (the prompt's last
  token after a prefill). :func:`note_penalty_lag` remembers that token and
  :func:`defer_penalty_lag` makes the installed batch's next cumulation use it, so the
  state goes on as on the old scheduler (a schedule stock SGLang itself runs).
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


PENALTY_ROWS = "gyges_penalty_rows"


def capture_penalties(batch: Any) -> int:
    """Store each request's rows of ``batch``'s prepared penalizers on the request (CPU
    copies, keyed ``Class.attribute``). Returns the number of requests with rows."""
    info = getattr(batch, "sampling_info", None)
    orch = getattr(info, "penalizer_orchestrator", None)
    reqs = list(getattr(batch, "reqs", None) or [])
    for req in reqs:
        setattr(req, PENALTY_ROWS, None)
    if orch is None or not reqs:
        return 0
    penalizers = [p for p in orch.penalizers.values() if p.is_prepared()]
    if not penalizers:
        return 0
    states = [(type(p).__name__, name, value) for p in penalizers
              for name, value in _row_state(p, len(reqs))]
    for i, req in enumerate(reqs):
        setattr(req, PENALTY_ROWS, {f"{cls}.{name}": value[i].detach().to("cpu").clone()
                                    for cls, name, value in states})
    return len(reqs)


def restore_penalties(batch: Any) -> int:
    """Write the rows :func:`capture_penalties` stored on ``batch``'s requests into its
    penalizers; the requests forget them. Returns the number of rows restored (0: nothing
    was captured, the caller replays instead). A request without rows had no penalty its
    old batch prepared, so its row in a penalizer prepared here has no effect."""
    reqs = list(getattr(batch, "reqs", None) or [])
    saved = [getattr(req, PENALTY_ROWS, None) for req in reqs]
    for req in reqs:
        setattr(req, PENALTY_ROWS, None)
    info = getattr(batch, "sampling_info", None)
    orch = getattr(info, "penalizer_orchestrator", None)
    if orch is None or not any(saved):
        return 0
    restored = 0
    for p in orch.penalizers.values():
        if not p.is_prepared():
            continue
        for name, value in _row_state(p, len(reqs)):
            key = f"{type(p).__name__}.{name}"
            for i, rows in enumerate(saved):
                row = rows.get(key) if rows else None
                if row is None or row.shape != value[i].shape:
                    continue
                value[i] = row.to(value.device, value.dtype)
                restored += 1
    return restored


PENALTY_LAG = "gyges_penalty_lag"


def note_penalty_lag(reqs: list[Any]) -> None:
    """Before the overlapped step in flight is processed: the token SGLang's next prepare
    would cumulate for each of its requests (the newest processed output, else the
    prompt's last token)."""
    for req in reqs:
        out = req.output_ids
        setattr(req, PENALTY_LAG, int(out[-1]) if len(out) else int(req.origin_input_ids[-1]))


def defer_penalty_lag(batch: Any) -> int:
    """Make the next ``cumulate_output_tokens`` of ``batch``'s orchestrator cumulate each
    request's noted lag token instead of its newest output (once; the requests forget
    it). Returns how many requests have one."""
    reqs = list(getattr(batch, "reqs", None) or [])
    lags = {id(r): getattr(r, PENALTY_LAG, None) for r in reqs}
    for req in reqs:
        setattr(req, PENALTY_LAG, None)
    info = getattr(batch, "sampling_info", None)
    orch = getattr(info, "penalizer_orchestrator", None)
    n = sum(v is not None for v in lags.values())
    if orch is None or not n or not orch.is_required:
        return 0
    original = orch.cumulate_output_tokens

    def once(output_ids: torch.Tensor) -> Any:
        del orch.cumulate_output_tokens  # back to the class's method
        ids = output_ids.clone()
        rows = (orch.batch or batch).reqs  # the orchestrator's batch, through merges
        for i, req in enumerate(rows):
            lag = lags.get(id(req))
            if lag is not None and i < ids.numel():
                ids[i] = lag
        return original(ids)

    orch.cumulate_output_tokens = once
    return n
