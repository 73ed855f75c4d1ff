"""Re-view SGLang's stock token-major MHA KV pool with fewer heads per row.

At degree k a rank stores H/k KV heads per token. On the stock pool
(``MHATokenToKVPool``: ``k_buffer[l]`` is ``[rows, H, D]``) the merged view is the same
storage with ``H/k`` heads per row: capacity in tokens stays the same for now, and the
unused (k-1)/k of each buffer is idle. Growing the capacity also needs the allocator,
``req_to_token`` and ``max_total_num_tokens`` to grow; the head-major pool replaces this.
Only valid while the pool holds no live KV (idle merge/split).
"""
from __future__ import annotations

from typing import Any

ORIG = "_gyges_tp1_buffers"


def reshape_kv_pool(pool: Any, head_num: int) -> None:
    """View ``pool``'s TP1 buffers with ``head_num`` heads per token row (same bytes)."""
    if getattr(pool, "gyges_kv_layout", None) == "head_major":
        _reshape_head_major(pool, head_num)
        return
    if not hasattr(pool, "k_buffer") or not hasattr(pool, "head_dim"):
        raise NotImplementedError(f"gyges: cannot re-view {type(pool).__name__}")
    if not hasattr(pool, ORIG):
        setattr(pool, ORIG, (list(pool.k_buffer), list(pool.v_buffer), pool.head_num))
    k0, v0, full = getattr(pool, ORIG)
    if full % head_num:
        raise ValueError(f"{head_num} heads do not divide the pool's {full}")
    d, dv = pool.head_dim, pool.v_head_dim
    rows = k0[0].shape[0]
    if head_num == full:
        pool.k_buffer, pool.v_buffer = list(k0), list(v0)
    else:
        pool.k_buffer = [b.view(-1)[: rows * head_num * d].view(rows, head_num, d) for b in k0]
        pool.v_buffer = [b.view(-1)[: rows * head_num * dv].view(rows, head_num, dv) for b in v0]
    pool.head_num = head_num
    pool.row_dim, pool.v_row_dim = head_num * d, head_num * dv
    if hasattr(pool, "_build_kv_buffer_descs"):
        pool._kv_buffer_descs = pool._build_kv_buffer_descs()
    if hasattr(pool, "_init_data_ptrs_and_strides"):
        pool._init_data_ptrs_and_strides()


def _reshape_head_major(pool: Any, head_num: int) -> None:
    """Head-major pool: the first ``head_num`` head blocks of each ``[H, S, D]`` storage,
    viewed as ``[S, head_num, D]`` (a TP1-style view of fewer heads; same slots). Idle
    groups only: which heads those blocks held before is irrelevant. The KV transfer of a
    live merge uses ``HeadMajorLayout.merged_view`` instead, with k times the slots."""
    if not hasattr(pool, ORIG):
        setattr(pool, ORIG, (list(pool.k_buffer), list(pool.v_buffer), pool.head_num))
    full = getattr(pool, ORIG)[2]
    if full % head_num:
        raise ValueError(f"{head_num} heads do not divide the pool's {full}")
    pool.k_buffer = [s[:head_num].permute(1, 0, 2) for s in pool.gyges_k_storage]
    pool.v_buffer = [s[:head_num].permute(1, 0, 2) for s in pool.gyges_v_storage]
    pool.head_num = head_num
    pool.row_dim, pool.v_row_dim = head_num * pool.head_dim, head_num * pool.v_head_dim
    for name in ("k_data_ptrs", "v_data_ptrs"):
        if hasattr(pool, name):
            bufs = pool.k_buffer if name[0] == "k" else pool.v_buffer
            old_ptrs = getattr(pool, name)
            setattr(pool, name, old_ptrs.new_tensor([b.data_ptr() for b in bufs]))


def full_head_num(pool: Any) -> int:
    return getattr(pool, ORIG)[2] if hasattr(pool, ORIG) else pool.head_num
