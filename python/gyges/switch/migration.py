"""Move a scheduler's in-flight requests across a merge or split, without recomputation.

Between two steps (the command hook runs after ``ingest_requests``) a scheduler's work is:
``running_batch`` (decode-ready requests holding KV in ``req_to_token`` rows), possibly the
extend batch of the last step not yet folded into it (:func:`settle` folds it, as the next
``get_next_batch_to_run`` would), and ``waiting_queue`` (requests without KV).

:func:`export_work` snapshots that work with every request's KV slots renumbered into the
new instance's slot space; the members exchange snapshots and :func:`install_work` rebuilds,
identically on every member, the scheduler state of the new instance:

- ``req_to_token`` rows re-allocated in request order, slots written;
- the prefix cache reset and rebuilt: every member's cached prefixes first
  (:mod:`gyges.switch.prefix_cache`, their KV moved by the same plan), then the running
  requests' protected prefixes (SGLang's own ``checkpoint``): requests that shared a prefix
  inside one replica share it again; the same prefix coming from two replicas is kept once
  and the other copy's slots become free;
- the allocator's free pages = every page neither a request row nor the tree uses;
- the running batch rebuilt decode-ready by SGLang's ``_build_hisparse_decode_batch``
  (seq lens from the requests, last tokens stashed in the relay buffer by row);
- the waiting queue concatenated in member order.

Every request kind moves: grammars are rebuilt and advanced, penalizer state replayed
(:mod:`gyges.switch.request_state`); a chunked prefill in flight is parked after its chunk
(:mod:`gyges.switch.chunked`). What cannot move (multimodal or session state, speculative
decoding, a chunked prefill that cannot be parked) makes :func:`not_movable` answer why;
the transformation then waits or refuses.
"""
from __future__ import annotations

import logging
import pickle
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gyges.switch import chunked, prefix_cache, request_state
from gyges.switch.capacity import set_free_pages

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """A scheduler's requests: running ones with their KV slots (new slot space)."""

    running: list[Any] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)
    waiting: list[Any] = field(default_factory=list)
    cached: list[prefix_cache.CachedNode] = field(default_factory=list)
    # slots (new slot space) written since a pre-copy's snapshot: their staged copy is stale
    written: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    @property
    def slots(self) -> torch.Tensor:
        """Every slot whose KV moves: the running requests' and the cached prefixes'."""
        return torch.cat([*self.rows, prefix_cache.node_slots(self.cached)])


def not_movable(s: Any) -> str | None:
    """Why this scheduler's work cannot be moved right now (None: it can)."""
    if not s.spec_algorithm.is_none():
        return "speculative decoding is not supported by live merge/split"
    why = chunked.why_not_parkable(s)
    if why is not None:
        return f"a chunked prefill is in progress and cannot be parked: {why}"
    lb = s.last_batch
    reqs = list(s.running_batch.reqs) + list(s.waiting_queue)
    if lb is not None and lb.forward_mode.is_extend():
        reqs += list(lb.reqs)
    for req in reqs:
        why = _req_not_movable(req)
        if why:
            return f"request {req.rid}: {why}"
    return None


def _req_not_movable(req: Any) -> str | None:
    """Grammars, penalties, logit bias, custom logit processors, seeds and logprobs move
    (:mod:`gyges.switch.request_state`); these do not."""
    if getattr(req, "multimodal_inputs", None) is not None:
        return "multimodal inputs (their encoder state is not moved)"
    if getattr(req, "session", None) is not None or getattr(req, "session_id", None):
        return "a session (/open_session state is not moved)"
    return None


def settle(s: Any) -> chunked.Parked | None:
    """Process the step in flight (overlap scheduler), fold the last extend batch into the
    running batch and drop finished requests.

    Under SGLang's overlap scheduler the step launched in the previous iteration has run and
    sampled but its result is still queued when commands are read: processing it here (as
    the loop's ``pop_and_process`` would) appends its tokens and finishes its requests, so
    the moved work is that of a settled step. ``last_batch`` is cleared, so the loop does
    not pop again; serving resumes overlapped with the next step. The penalizers' rows are
    captured with the token the next step would have cumulated for the requests of the
    step settled here (:mod:`gyges.switch.request_state`). A chunked prefill in flight
    stays out of the running batch (as SGLang's loop keeps it) and is parked
    (:func:`gyges.switch.chunked.park`); it is returned.
    """
    queue = getattr(s, "result_queue", None)
    while queue:
        batch, result = queue.popleft()
        request_state.note_penalty_lag(batch.reqs)
        s.process_batch_result(batch, result)
        logger.info("Gyges: settled the overlapped step in flight (%d requests)",
                    len(batch.reqs))
    lb = s.last_batch
    if lb is not None and lb.forward_mode.is_extend() and lb is not s.running_batch:
        lb.filter_batch(reqs_to_exclude=s.chunked_req)
        if not lb.is_empty():
            if s.running_batch.is_empty():
                s.running_batch = lb
            else:
                s.running_batch.merge_batch(lb)
    s.running_batch.filter_batch()
    s.last_batch = None
    request_state.capture_penalties(s.running_batch)
    return chunked.park(s)


def export_work(s: Any, slot_offset: int = 0) -> Work:
    """This scheduler's settled work; KV slots shifted by ``slot_offset``."""
    req_to_token = s.req_to_token_pool.req_to_token
    work = Work(waiting=list(s.waiting_queue))
    for req in s.running_batch.reqs:
        n = int(req.kv.kv_allocated_len)
        row = req_to_token[req.kv.req_pool_idx, :n].to("cpu", torch.int64) + slot_offset
        work.running.append(req)
        work.rows.append(row)
    work.cached = prefix_cache.export_tree(prefix_cache.usable_tree(s), slot_offset)[0]
    return work


def to_bytes(work: Work) -> bytes:
    """Pickle ``work`` for peers (tree links stripped from shallow copies)."""
    return pickle.dumps(Work([_detached(r) for r in work.running], work.rows,
                             [_detached(r) for r in work.waiting], work.cached, work.written))


def from_bytes(data: bytes) -> Work:
    """A peer's work as sent (see :func:`receive` for what makes it installable here)."""
    work = pickle.loads(data)
    for req in (*work.running, *work.waiting):
        req.time_stats = _unpack_time_stats(req.time_stats)
    return work


def receive(s: Any, data: bytes) -> Work:
    """A peer's work, its requests given back what did not cross (grammar, references).
    Runs before the commit vote: a request that cannot be rebuilt here refuses."""
    work = from_bytes(data)
    for req in (*work.running, *work.waiting):
        request_state.reattach(s, req)
    return work


def _detached(req: Any) -> Any:
    c = request_state.detach(req)
    c.last_node, c.lock = None, None
    # With --enable-metrics a request holds its scheduler's Prometheus collector (locks);
    # the installing scheduler attaches its own (_attach_metrics).
    c.metrics_collector = None
    c.time_stats = _pack_time_stats(req.time_stats)
    return c


def _attach_metrics(s: Any, req: Any) -> None:
    """Give a migrated request this scheduler's collector, as SGLang does for new ones."""
    reporter = getattr(s, "metrics_reporter", None)
    collector = getattr(s, "metrics_collector", None)
    enabled = bool(reporter is not None and getattr(reporter, "enable_metrics", False))
    req.metrics_collector = collector if enabled else None
    ts = req.time_stats
    if ts is None:
        return
    if enabled and collector is not None:
        ts.set_metrics_collector(collector)
    else:
        ts.enable_metrics, ts.metrics_collector = False, None


# SGLang pickles a request's time stats for the detokenizer (most fields dropped, no
# tracing context); a migrated request keeps its timestamps, minus what cannot cross.
def _pack_time_stats(ts: Any) -> tuple[type, dict[str, Any]] | None:
    if ts is None:
        return None
    kept = {}
    for name, value in vars(ts).items():
        if name == "trace_ctx":
            continue
        try:
            pickle.dumps(value)
        except Exception:
            continue
        kept[name] = value
    return type(ts), kept


def _unpack_time_stats(packed: tuple[type, dict[str, Any]] | None) -> Any:
    if packed is None:
        return None
    from sglang.srt.observability.trace import TraceNullContext

    cls, fields = packed
    ts = object.__new__(cls)
    ts.__dict__.update(fields)
    ts.trace_ctx = TraceNullContext()
    return ts


def install_work(s: Any, works: Sequence[Work]) -> dict[str, int]:
    """Make ``works`` (in member order; slots in this instance's space) the scheduler's
    whole state. Collective-free and deterministic: every member runs it alike."""
    running = [r for w in works for r in w.running]
    rows = [row for w in works for row in w.rows]
    waiting = [r for w in works for r in w.waiting]
    pool = s.req_to_token_pool
    pool.clear()
    idx = pool.alloc_rows(len(running))
    if idx is None:
        raise RuntimeError(f"{len(running)} running requests exceed the "
                           f"{pool.size} req_to_token rows")
    idx = sorted(idx)
    for req, row, i in zip(running, rows, idx, strict=True):
        req.kv.req_pool_idx = i
        pool.req_to_token[i, : row.numel()] = row.to(pool.req_to_token.dtype)
    cached = [w.cached for w in works if w.cached]  # parents index each work's own list
    shared, restored = _rebuild_prefix_cache(s, running, cached)
    used = [pool.req_to_token[r.kv.req_pool_idx, : int(r.kv.kv_allocated_len)]
            for r in running]
    set_free_pages(s, torch.cat([*used, prefix_cache.tree_slots(s)]))
    for req in waiting:
        req.last_node, req.lock, req.prefix_len = None, None, 0
    for req in (*running, *waiting):
        _attach_metrics(s, req)
    s.waiting_queue = waiting
    s.running_batch = _decode_batch(s, running)
    s.last_batch = None
    if not request_state.restore_penalties(s.running_batch):  # copied rows, else replay
        request_state.replay_penalties(s.running_batch)
    request_state.defer_penalty_lag(s.running_batch)
    return {"running": len(running), "waiting": len(waiting), "prefix_tokens_shared": shared,
            "prefix_tokens_cached": restored}


def _rebuild_prefix_cache(s: Any, running: list[Any],
                          cached: list[list[prefix_cache.CachedNode]]) -> tuple[int, int]:
    """Reset the tree, insert the cached prefixes (each work's nodes), then re-insert each
    running request's protected prefix. Returns (tokens shared, cached tokens restored)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    tree = s.tree_cache
    tree.reset()
    root = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q"), None))).last_device_node
    alloc = s.token_to_kv_pool_allocator
    names = [n for n in ("free", "free_segment", "free_page_ids") if hasattr(alloc, n)]
    for n in names:  # duplicates are released by set_free_pages, not by the tree
        setattr(alloc, n, _no_free)
    shared = restored = 0
    try:
        if not getattr(tree, "disable", False):
            for nodes in cached:
                restored += prefix_cache.import_tree(prefix_cache.usable_tree(s), nodes)
        for req in running:
            protected = int(req.kv.cache_protected_len)
            req.kv.cache_protected_len = req.kv.cache_inserted_len = 0
            req.lock, req.last_node = None, root
            if protected and not getattr(tree, "disable", False):
                row = s.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :protected].clone()
                tree.checkpoint(req, up_to=protected)
                after = s.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :protected]
                shared += int((after != row).sum())
    finally:
        for n in names:
            vars(alloc).pop(n, None)
    return shared, restored


def _no_free(*_args: Any, **_kwargs: Any) -> None:
    return None


def _decode_batch(s: Any, reqs: list[Any]) -> Any:
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    if not reqs:
        return ScheduleBatch(reqs=[], batch_is_full=False)
    batch = s._build_hisparse_decode_batch(reqs)
    if batch.return_logprob:
        batch.token_ids_logprobs = [r.logprob.token_ids_logprob for r in reqs]
    batch.multimodal_inputs = [None] * len(reqs)
    return batch
