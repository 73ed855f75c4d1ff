"""A merged instance serves first the requests only it can hold (SGLang side of
:mod:`gyges.core.preemption`).

Runs on every rank of a merged instance before SGLang forms a prefill batch
(``Scheduler.get_new_batch_prefill``): waiting requests that one replica could not hold
(prompt + ``max_new_tokens`` above one replica's usable KV) are marked *long* and put at
the head of the waiting queue (SGLang's policy sort keeps them there: see
:func:`long_requests_first`); if the first of them does not fit the free KV, just enough
short running requests are retracted through SGLang's own retraction (``release_req``,
then back to the waiting queue, recomputed when admitted again), as SGLang's priority
preemption does at the same point of the step. The inputs (queues, batch, pool, tree,
new-token ratio) are the same on every rank of an instance, so every rank decides alike.
"""
from __future__ import annotations

import logging
from typing import Any

from gyges.core.preemption import Running, plan_retraction
from gyges.core.request_limits import request_need

logger = logging.getLogger(__name__)

LONG = "_gyges_long"


def is_long(req: Any) -> bool:
    return bool(getattr(req, LONG, False))


def long_requests_first(queue: list[Any]) -> None:
    """Move the marked long requests to the head of ``queue``, both parts in order."""
    if any(is_long(r) for r in queue):
        queue[:] = [r for r in queue if is_long(r)] + [r for r in queue if not is_long(r)]


def make_room(scheduler: Any, running_batch: Any, replica_usable: int) -> list[str]:
    """Mark and front the long waiting requests; retract short running ones until the
    first long request fits; none retracted before (SGLang counts ``retraction_count``,
    and it moves with the request in a transformation). Returns the rids retracted
    (usually none)."""
    queue = scheduler.waiting_queue
    for r in queue:
        if not is_long(r) and _need(r) > replica_usable:
            setattr(r, LONG, True)
    long_requests_first(queue)
    if not queue or not is_long(queue[0]) or scheduler.chunked_req is not None:
        return []
    head = queue[0]
    ratio = float(scheduler.new_token_ratio_tracker.current)
    running = [Running(i, _held(r), _reserved(r, ratio), len(r.output_ids),
                       keep=_need(r) > replica_usable or not retractable(r),
                       retracted=int(getattr(r, "retraction_count", 0)))
               for i, r in enumerate(running_batch.reqs) if not r.finished()]
    free = (scheduler.token_to_kv_pool_allocator.available_size()
            + scheduler.tree_cache.evictable_size()
            - sum(r.reserved for r in running))
    plan = plan_retraction(_admission_need(head, scheduler.page_size) - free, running)
    limit = getattr(scheduler, "max_queued_requests", None)
    if not plan or (limit is not None and len(queue) + len(plan) > limit):
        return []  # SGLang would abort a retracted request that overflows the queue
    return _retract(scheduler, running_batch, plan, head)


def _retract(scheduler: Any, batch: Any, plan: list[int], head: Any) -> list[str]:
    chosen = set(plan)
    released, keep = [], []
    for i, req in enumerate(batch.reqs):
        if i in chosen:
            released.append(req)
            batch.release_req(i, len(batch.reqs) - len(released))
        else:
            keep.append(i)
    batch.filter_batch(keep_indices=keep)
    batch.batch_is_full = False
    for req in released:
        scheduler._add_request_to_queue(req, is_retracted=True)
    rids = [str(r.rid) for r in released]
    logger.info("Gyges: retracted %d running requests (%s) so that request %s, which only "
                "the merged instance can hold, is admitted", len(rids), ", ".join(rids),
                head.rid)
    return rids


def retractable(req: Any) -> bool:
    """Whether SGLang's retraction keeps what the request's next tokens depend on. It keeps
    the tokens and the grammar matcher (the request is recomputed from its prompt and
    output), but rebuilds the penalizers from zero (frequency, presence and repetition
    penalties, ``min_new_tokens`` not yet met), and resets logprob bookkeeping; a custom
    logit processor may keep state of its own, sessions and beam groups have theirs."""
    p = req.sampling_params
    penalised = (float(p.frequency_penalty or 0.0) != 0.0 or float(p.presence_penalty or 0.0)
                 != 0.0 or float(p.repetition_penalty or 1.0) != 1.0
                 or int(p.min_new_tokens or 0) > len(req.output_ids))
    return not (penalised or req.return_logprob or req.custom_logit_processor is not None
                or getattr(req, "session", None) is not None
                or getattr(req, "beam_group", None) is not None)


def _need(req: Any) -> int:
    return request_need(len(req.origin_input_ids), req.sampling_params.max_new_tokens)


def _remaining_new(req: Any) -> int:
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    left = max(int(req.sampling_params.max_new_tokens or 0) - len(req.output_ids), 0)
    return min(left, CLIP_MAX_NEW_TOKENS)


def _reserved(req: Any, ratio: float) -> int:
    """What SGLang's admission sets aside for a running request's remaining output."""
    return int(_remaining_new(req) * (1.0 if req.sampling_params.ignore_eos else ratio))


def _held(req: Any) -> int:
    """The KV slots the request holds: its own and its prefix in the radix tree, which
    becomes evictable when it is released. A prefix another request also locks stays
    held: then the first retraction frees less than counted and the next step, which
    counts the pool again, retracts more."""
    return max(int(req.kv.kv_allocated_len), 0)


def _admission_need(req: Any, page_size: int) -> int:
    """SGLang's admission test for a new request, without prefix hits (which only lower it):
    its tokens so far, its remaining output, one page of allocation overhead."""
    return (len(req.origin_input_ids) + len(req.output_ids) + _remaining_new(req)
            + max(int(page_size), 1))
