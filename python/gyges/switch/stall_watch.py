"""A scheduler that holds waiting requests and admits none of them: say so, with why.

SGLang's admission (``get_new_batch_prefill``) declines a queue silently. After a
transformation the scheduler's capacity, rows and prefix cache were rebuilt by Gyges, so a
queue that stops moving is the first sign of a wrong rebuild. :class:`StallWatch` is fed
once per event-loop iteration; when the queue's head has not changed for ``after_s`` while
nothing runs, it logs (once per stall) what admission sees.
"""
from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)
STALL_AFTER_S = 10.0


class StallWatch:
    def __init__(self, rank: int, after_s: float = STALL_AFTER_S) -> None:
        self.rank = rank
        self.after_s = after_s
        self._head: str | None = None
        self._since = 0.0
        self._reported = False

    def observe(self, s: Any, now: float | None = None) -> dict[str, Any] | None:
        """Feed one iteration; returns the diagnosis when a stall is first reported."""
        now = time.monotonic() if now is None else now
        waiting = getattr(s, "waiting_queue", None) or ()  # read, never copied: hot path
        running = getattr(getattr(s, "running_batch", None), "reqs", None) or []
        if not waiting or running:
            self._head, self._reported = None, False
            return None
        head = str(waiting[0].rid)
        if head != self._head:
            self._head, self._since, self._reported = head, now, False
            return None
        if self._reported or now - self._since < self.after_s:
            return None
        self._reported = True
        why = diagnose(s)
        logger.error("gyges: rank %d holds %d waiting requests and has admitted none for "
                     "%.0f s: %s", self.rank, len(waiting), now - self._since, why)
        return why


def _need(req: Any) -> dict[str, Any]:
    prompt = len(req.origin_input_ids) + len(req.output_ids)
    new = req.sampling_params.max_new_tokens
    return {"rid": str(req.rid), "tokens": prompt, "max_new_tokens": new}


def diagnose(s: Any) -> dict[str, Any]:
    """What SGLang's admission reads: free KV, evictable cache, rows, caps, flags."""
    out: dict[str, Any] = {"head": [_need(r) for r in list(s.waiting_queue)[:3]]}
    probes = {
        "kv_available": lambda: s.token_to_kv_pool_allocator.available_size(),
        "kv_evictable": lambda: s.tree_cache.evictable_size(),
        "kv_protected": lambda: s.tree_cache.protected_size(),
        "max_total_num_tokens": lambda: s.max_total_num_tokens,
        "max_req_len": lambda: s.max_req_len,
        "rows_available": lambda: s.req_to_token_pool.available_size(),
        "max_running_requests": lambda: s.max_running_requests,
        "batch_is_full": lambda: s.running_batch.batch_is_full,
        "chunked_req": lambda: getattr(s.chunked_req, "rid", None),
        "tp_size": lambda: s.tp_size,
        "last_batch": lambda: None if s.last_batch is None else str(s.last_batch.forward_mode),
    }
    for name, probe in probes.items():
        try:
            value = probe()
            out[name] = value if isinstance(value, (str, bool, type(None))) else int(value)
        except Exception as e:  # a diagnosis never breaks the loop
            out[name] = f"{type(e).__name__}"
    return out
