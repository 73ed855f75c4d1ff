"""A chunked prefill in flight across a transformation (issue 13, item 3).

SGLang prefills a long prompt in chunks of ``--chunked-prefill-size`` tokens, one chunk per
step. Between two chunks the request is ``Scheduler.chunked_req``: in no batch and no queue,
holding the KV of the chunks done in its ``req_to_token`` row. A merge or split does not
wait for the remaining chunks (a 100k-token document is dozens of them): once the settle
has processed the chunk in flight, the request is *parked*:

- the KV of the chunks done is published in the radix cache by SGLang's own
  ``release_kv_cache(checkpoint=True)`` (what every chunk boundary stashes anyway) and the
  request's row is freed;
- the request goes back to the head of the waiting queue as one that has not started.

The prefix cache moves with the transformation like any cached prefix (same plan as the
KV), so on the new instance the request matches what it computed and prefills only the
rest: nothing is recomputed but, with page size p, the < p tokens of a partial page. Its
``cached_tokens`` count stays what stock SGLang reports, and it is not counted as retracted.
A transformation refused after the park leaves the request to resume the same way on its
old instance. A request returning input logprobs from a position ``L`` its chunks done
passed resumes at ``L`` instead: SGLang caps such a request's prefix match at ``L`` (as
for a retracted one), so the tokens from ``L`` on are computed again, with their logprobs
(the accumulated ones are reset like a retraction's).

Not parked (the transformation waits for the prefill to finish, bounded by the
controller): a request being aborted, one barred from the prefix cache, and schedulers
whose tree this project cannot move (radix cache off, mamba state).
``GYGES_PARK_CHUNKED_PREFILL=0`` turns parking off (every chunked prefill is waited for, as
before 2026-12-06; ``@PATH`` reads it from a file at each check, so a benchmark compares
both on one server).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from gyges.switch import prefix_cache
from gyges.switch.protocol import knob

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parked:
    """A chunked prefill handed back to the waiting queue."""

    req: Any
    slots: torch.Tensor  # KV slots of its chunks done (this instance's ids), now the tree's


def enabled() -> bool:
    """Whether chunked prefills in flight are parked (``GYGES_PARK_CHUNKED_PREFILL``, on
    unless 0/false/off/no)."""
    return knob("GYGES_PARK_CHUNKED_PREFILL").lower() not in ("0", "false", "off", "no")


def why_not_parkable(s: Any) -> str | None:
    """Why the scheduler's chunked prefill in flight cannot be parked (None: there is
    none, or it can)."""
    req = s.chunked_req
    if req is None:
        return None
    if not enabled():
        return "parking is off (GYGES_PARK_CHUNKED_PREFILL=0)"
    tree = prefix_cache.usable_tree(s)
    if tree is None:
        return "the prefix cache is off or cannot be moved"
    supports_mamba = getattr(tree, "supports_mamba", None)
    if supports_mamba is not None and supports_mamba():
        return "a mamba state cache"
    if getattr(s, "_pending_chunked_abort_req", None) is req:
        return "it is being aborted"
    if getattr(req, "skip_radix_cache_insert", False):
        return "it is barred from the prefix cache"
    return None


def park(s: Any) -> Parked | None:
    """Park the scheduler's chunked prefill in flight (see the module docstring). Runs after
    :func:`gyges.switch.migration.settle` processed the chunk in flight and kept the request
    out of the running batch. Not checked again here: the prepare step, on this scheduler
    thread with no input read since, refused what :func:`why_not_parkable` names (a second
    read of the switch could differ, and a split's settle runs after its vote, where an
    exception would take the host down)."""
    from sglang.srt.mem_cache.common import release_kv_cache

    req = s.chunked_req
    if req is None:
        return None
    done = int(req.kv.kv_committed_len)
    slots = s.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :done].to("cpu", torch.int64)
    kept = (req.retraction_count, req.is_retracted, req.retracted_stain)
    computed = int(req.already_computed)
    release_kv_cache(req, s.tree_cache, checkpoint=True)
    published = int(req.kv.cache_protected_len)
    req.reset_for_retract()  # the state of a request that has not started
    # ... but it was not retracted: its counters and cached-token accounting stay (the
    # prefix it matches next is its own work, not a cache hit)
    req.retraction_count, req.is_retracted, req.retracted_stain = kept
    resumes = min(published, resume_cap(req))
    req.already_computed = min(computed, resumes)
    s.chunked_req = None
    s.waiting_queue.insert(0, req)
    logger.info("gyges: parked chunked prefill %s: %d of %d prompt tokens done, %d published "
                "in the prefix cache, resumes at %d", req.rid, done, len(req.origin_input_ids),
                published, resumes)
    return Parked(req, slots[:published])


def resume_cap(req: Any) -> int:
    """The longest prefix a parked request can match when it resumes: SGLang matches no
    further than ``logprob_start_len`` for a request returning input logprobs from there
    (they are computed again), else its whole prompt."""
    if req.return_logprob and req.logprob_start_len >= 0:
        return int(req.logprob_start_len)
    return len(req.origin_input_ids)
