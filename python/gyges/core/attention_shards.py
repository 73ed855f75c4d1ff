"""Owned-head slices of attention weights at degree k, consistent with the KV layout.

Local rank r of a degree-k instance owns the KV heads h with h % k == r (interleaved, as in
`kv_layout`), and with them their GQA query heads. With g = Hq / Hkv::

    owned KV heads (local index a):   a*k + r                      a = 0 .. Hkv/k - 1
    owned q heads (local index j):    (a*k + r)*g + t              j = a*g + t, t = 0 .. g-1

so local q head j attends with local KV head j // g, exactly as in an unsharded GQA layer
with Hq/k and Hkv/k heads. The fused QKV weight `[(Hq + 2*Hkv) * D, ...]` is laid out
`[q heads | k heads | v heads]`, each head D rows; its local slice keeps that layout with the
owned heads in ascending order. o_proj `[Hd, Hq * D]` keeps the columns of the owned q heads;
the partial outputs of the k ranks sum (all-reduce) to the dense output. An o_proj bias must be
added once (e.g. on local rank 0 only), as SGLang's RowParallelLinear does.
"""

from __future__ import annotations

import torch

from gyges.core.kv_layout import check_degree, check_local_rank


def _check_heads(num_q_heads: int, num_kv_heads: int, k: int, local_rank: int) -> int:
    """Validate and return the GQA group size g = Hq / Hkv."""
    if num_q_heads < 1 or num_kv_heads < 1 or num_q_heads % num_kv_heads != 0:
        raise ValueError(
            f"q heads ({num_q_heads}) must be a positive multiple of KV heads ({num_kv_heads})"
        )
    check_degree(k, num_kv_heads)
    check_local_rank(local_rank, k)
    return num_q_heads // num_kv_heads


def owned_kv_heads(num_kv_heads: int, k: int, local_rank: int) -> list[int]:
    """KV heads owned at degree k by `local_rank`: `[a*k + r for a in range(Hkv // k)]`."""
    check_degree(k, num_kv_heads)
    check_local_rank(local_rank, k)
    return list(range(local_rank, num_kv_heads, k))


def owned_q_heads(num_q_heads: int, num_kv_heads: int, k: int, local_rank: int) -> list[int]:
    """Query heads of the owned KV heads, ascending (Hq / k of them)."""
    group = _check_heads(num_q_heads, num_kv_heads, k, local_rank)
    return [
        h * group + t for h in owned_kv_heads(num_kv_heads, k, local_rank) for t in range(group)
    ]


def qkv_row_index(
    num_q_heads: int, num_kv_heads: int, head_dim: int, k: int, local_rank: int
) -> torch.Tensor:
    """int64 indices of the fused-QKV rows a rank keeps: owned q, then k, then v head rows."""
    q_heads = owned_q_heads(num_q_heads, num_kv_heads, k, local_rank)
    kv_heads = owned_kv_heads(num_kv_heads, k, local_rank)
    k_base = num_q_heads * head_dim
    v_base = k_base + num_kv_heads * head_dim
    heads = torch.tensor(
        [h * head_dim for h in q_heads]
        + [k_base + h * head_dim for h in kv_heads]
        + [v_base + h * head_dim for h in kv_heads],
        dtype=torch.int64,
    )
    return (heads[:, None] + torch.arange(head_dim)).reshape(-1)


def o_proj_col_index(
    num_q_heads: int, num_kv_heads: int, head_dim: int, k: int, local_rank: int
) -> torch.Tensor:
    """int64 indices of the o_proj input columns of the owned q heads."""
    q_heads = torch.tensor(owned_q_heads(num_q_heads, num_kv_heads, k, local_rank))
    return (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def slice_qkv(
    weight_or_bias: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k: int,
    local_rank: int,
) -> torch.Tensor:
    """Rows of a fused QKV weight `[(Hq + 2*Hkv) * D, Hd]` or bias `[(Hq + 2*Hkv) * D]` for
    the owned heads: `[(Hq + 2*Hkv) / k * D, ...]`, a new contiguous tensor."""
    rows = (num_q_heads + 2 * num_kv_heads) * head_dim
    if weight_or_bias.dim() not in (1, 2) or weight_or_bias.shape[0] != rows:
        raise ValueError(
            f"fused QKV tensor must have {rows} rows, got shape {tuple(weight_or_bias.shape)}"
        )
    index = qkv_row_index(num_q_heads, num_kv_heads, head_dim, k, local_rank)
    return weight_or_bias.index_select(0, index.to(weight_or_bias.device))


def slice_o_proj(
    weight: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k: int,
    local_rank: int,
) -> torch.Tensor:
    """Columns of o_proj `[Hd, Hq * D]` for the owned q heads: `[Hd, Hq / k * D]`, a new
    contiguous tensor."""
    cols = num_q_heads * head_dim
    if weight.dim() != 2 or weight.shape[1] != cols:
        raise ValueError(f"o_proj weight must be [Hd, {cols}], got {tuple(weight.shape)}")
    index = o_proj_col_index(num_q_heads, num_kv_heads, head_dim, k, local_rank)
    return weight.index_select(1, index.to(weight.device))


def rank_major_heads(num_q_heads: int, num_kv_heads: int, k: int, *, kv: bool) -> list[int]:
    """The model head of each position when the k ranks' owned heads (q heads, or KV heads
    with ``kv``) are concatenated in rank order, as an all-gather along heads yields them::

        Hq = 4, Hkv = 2, k = 2:  rank 0 owns q heads 0 1, rank 1 owns 2 3 -> [0, 1, 2, 3]
        Hq = Hkv = 4, k = 2:     rank 0 owns heads 0 2, rank 1 owns 1 3   -> [0, 2, 1, 3]
    """
    def owned(rank: int) -> list[int]:
        if kv:
            return owned_kv_heads(num_kv_heads, k, rank)
        return owned_q_heads(num_q_heads, num_kv_heads, k, rank)

    return [h for rank in range(k) for h in owned(rank)]
