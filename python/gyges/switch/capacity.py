"""KV capacity of a degree-k instance: the head-major pool viewed at degree k, k times the slots.

At degree k each member's ``[H, S, D]`` storages are read through
:meth:`HeadMajorLayout.merged_view` as ``[k*S, H/k, D]``: the same bytes hold H/k heads of
k*S merged slots (segment i = slots of replica i of the instance). Merged page 0 pads the
instance; every other page is allocatable, so the instance holds ``k*S - page_size`` tokens
(``k`` times a replica's capacity plus the other segments' padding pages).

:func:`apply_degree` re-views the pool and resizes what SGLang sized from the pool at
startup: the allocator's size, the scheduler's ``max_total_num_tokens`` (and the copies its
components cached) and its request-length caps. The allocator's free list is the caller's
(:mod:`gyges.switch.migration` rebuilds it from the requests that survive the switch).
"""
from __future__ import annotations

from typing import Any

import torch

from gyges.core.request_limits import request_need, usable_tokens

_CAPACITY_COPIES = ("pool_stats_observer", "invariant_checker", "load_inquirer",
                    "kv_events_publisher")


def pool_of(scheduler: Any) -> Any:
    pool = scheduler.tp_worker.model_runner.token_to_kv_pool
    if getattr(pool, "gyges_kv_layout", None) != "head_major":
        raise NotImplementedError("gyges: merging needs the head-major KV pool "
                                  f"(this rank has {type(pool).__name__})")
    return pool


def slots_per_replica(pool: Any) -> int:
    return int(pool.gyges_k_layout.slots_per_replica)


def capacity_at(pool: Any, k: int) -> int:
    """Allocatable tokens of a degree-``k`` instance."""
    return k * slots_per_replica(pool) - int(pool.page_size)


def view_pool(pool: Any, k: int) -> None:
    """Point ``k_buffer``/``v_buffer`` at the degree-``k`` merged views (no copy)."""
    pool.k_buffer = [pool.gyges_k_layout.merged_view(s, k) for s in pool.gyges_k_storage]
    pool.v_buffer = [pool.gyges_v_layout.merged_view(s, k) for s in pool.gyges_v_storage]
    full = pool.gyges_k_layout.num_kv_heads
    pool.head_num = full // k
    pool.row_dim, pool.v_row_dim = pool.head_num * pool.head_dim, pool.head_num * pool.v_head_dim
    for name, bufs in (("k_data_ptrs", pool.k_buffer), ("v_data_ptrs", pool.v_buffer)):
        old = getattr(pool, name, None)
        if isinstance(old, torch.Tensor):
            setattr(pool, name, old.new_tensor([b.data_ptr() for b in bufs]))


def apply_degree(scheduler: Any, k: int) -> int:
    """View the pool at degree ``k`` and size the allocator and scheduler caps for it.
    Returns the new capacity in tokens. Leaves the allocator's free list to the caller."""
    pool = pool_of(scheduler)
    view_pool(pool, k)
    size = capacity_at(pool, k)
    pool.size = size
    alloc = scheduler.token_to_kv_pool_allocator
    alloc.size = size
    if hasattr(alloc, "num_pages"):
        alloc.num_pages = size // alloc.page_size
    s = scheduler
    s.max_total_num_tokens = size
    for name in _CAPACITY_COPIES:
        comp = getattr(s, name, None)
        if comp is not None and hasattr(comp, "max_total_num_tokens"):
            # some are frozen dataclasses: their copy is still SGLang's to keep in sync
            object.__setattr__(comp, "max_total_num_tokens", size)
    s.max_req_len = min(s.model_config.context_len - 1, size - 1)
    s.max_req_input_len = s.max_req_len - 5
    return size


def set_free_pages(scheduler: Any, used_slots: torch.Tensor) -> None:
    """Make every allocatable page not holding one of ``used_slots`` free (sorted)."""
    alloc = scheduler.token_to_kv_pool_allocator
    page = int(alloc.page_size)
    num_pages = int(alloc.size) // page
    free = torch.ones(num_pages + 1, dtype=torch.bool)
    free[0] = False
    if used_slots.numel():
        free[torch.unique(used_slots.to("cpu", torch.int64) // page)] = False
    alloc.free_pages = torch.nonzero(free).flatten().to(alloc.device)
    alloc.free_group = None
    if hasattr(alloc, "release_pages"):
        alloc.release_pages = torch.empty((0,), dtype=torch.int64, device=alloc.device)
    if hasattr(alloc, "staged_pages"):
        alloc.staged_pages, alloc.num_staged_pages = [], 0
    if hasattr(alloc, "free_page_ids_group"):
        alloc.free_page_ids_group = []


def oversized(scheduler: Any, k: int) -> str | None:
    """Why an instance of degree ``k`` (a split's half) could not serve every running and
    waiting request of this scheduler to its end unclipped (None: it can). Such a request
    would wait forever in the half's queue (SGLang's admission declines it at every step)
    or be retracted and recomputed there."""
    s = scheduler
    pool = pool_of(s)
    room = usable_tokens(capacity_at(pool, k), int(pool.page_size))
    reqs = [*s.running_batch.reqs, *s.waiting_queue]
    lb = s.last_batch  # an extend batch the settle folds in, a chunked prefill it parks
    if lb is not None and lb is not s.running_batch and lb.forward_mode.is_extend():
        reqs += [q for q in lb.reqs if not q.finished()]
    if s.chunked_req is not None:
        reqs.append(s.chunked_req)
    for req in reqs:
        need = request_need(len(req.origin_input_ids),
                            getattr(req.sampling_params, "max_new_tokens", None))
        if need > room:
            return (f"request {req.rid} needs {need} KV slots (prompt + max_new_tokens); "
                    f"a TP{k} half holds {room}")
    return None
