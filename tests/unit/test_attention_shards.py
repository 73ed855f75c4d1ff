from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.attention_shards import (
    owned_kv_heads,
    owned_q_heads,
    rank_major_heads,
    slice_o_proj,
    slice_qkv,
)
from gyges.core.kv_layout import HeadMajorLayout
from gyges.core.transfer_plan import apply_plan, plan_transformation

HIDDEN = 12


def _gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Reference GQA attention: q `[T, Hq, D]`, k/v `[L, Hkv, D]` -> `[T, Hq * D]`; with
    `causal` the T queries are the last T of the L keys."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) / q.shape[-1] ** 0.5
    if causal:
        t, length = q.shape[0], k.shape[0]
        future = torch.arange(length)[None, :] > torch.arange(length - t, length)[:, None]
        scores = scores.masked_fill(future, float("-inf"))
    out = torch.einsum("htl,lhd->thd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], -1)


def _weights(hq: int, hkv: int, d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn((hq + 2 * hkv) * d, HIDDEN, generator=gen) / HIDDEN**0.5
    bias = torch.randn((hq + 2 * hkv) * d, generator=gen)
    o_proj = torch.randn(HIDDEN, hq * d, generator=gen) / (hq * d) ** 0.5
    return qkv, bias, o_proj


def _project(x: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, hq: int, hkv: int, d: int):
    out = x @ qkv.t() + bias
    q, k, v = out.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.unflatten(-1, (hq, d)), k.unflatten(-1, (hkv, d)), v.unflatten(-1, (hkv, d))


@settings(max_examples=25, deadline=None)
@given(
    hkv_log=st.integers(0, 3), group=st.sampled_from([1, 2, 3]), d=st.sampled_from([2, 4]),
    data=st.data(),
)  # fmt: skip
def test_sharded_attention_sums_to_full(hkv_log: int, group: int, d: int, data: st.DataObject):
    hkv = 1 << hkv_log
    hq = hkv * group
    k = 1 << data.draw(st.integers(0, hkv_log))
    qkv, bias, o_proj = _weights(hq, hkv, d)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(1))
    full = _gqa(*_project(x, qkv, bias, hq, hkv, d)) @ o_proj.t()

    total = torch.zeros_like(full)
    for r in range(k):
        w, b = slice_qkv(qkv, hq, hkv, d, k, r), slice_qkv(bias, hq, hkv, d, k, r)
        local = _gqa(*_project(x, w, b, hq // k, hkv // k, d))
        total += local @ slice_o_proj(o_proj, hq, hkv, d, k, r).t()
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


def test_slices_are_the_owned_heads() -> None:
    hq, hkv, d, k, r = 8, 4, 3, 2, 1
    assert owned_kv_heads(hkv, k, r) == [1, 3]
    assert owned_q_heads(hq, hkv, k, r) == [2, 3, 6, 7]
    rows = torch.arange((hq + 2 * hkv) * d)
    got = slice_qkv(rows, hq, hkv, d, k, r).view(-1, d)[:, 0] // d
    # q heads 2,3,6,7; then k heads 1,3 (rows after 8 q heads); then v heads 1,3
    assert got.tolist() == [2, 3, 6, 7, 8 + 1, 8 + 3, 12 + 1, 12 + 3]
    cols = slice_o_proj(torch.arange(hq * d)[None, :], hq, hkv, d, k, r)[0]
    assert (cols.view(-1, d)[:, 0] // d).tolist() == [2, 3, 6, 7]
    assert slice_qkv(rows[:, None].float(), hq, hkv, d, k, r).is_contiguous()


def test_validation() -> None:
    with pytest.raises(ValueError, match="multiple"):
        owned_q_heads(6, 4, 1, 0)
    with pytest.raises(ValueError, match="does not divide"):
        owned_q_heads(8, 2, 4, 0)
    with pytest.raises(ValueError, match="rows"):
        slice_qkv(torch.zeros(10, 3), 2, 1, 2, 1, 0)
    with pytest.raises(ValueError, match="o_proj"):
        slice_o_proj(torch.zeros(3, 10), 2, 1, 2, 1, 0)


@pytest.mark.parametrize("k", [2, 4])
def test_merged_kv_pool_serves_sharded_attention(k: int) -> None:
    """End to end: k TP1 replicas write K/V into head-major pools, the group merges by the
    transfer plan, and each rank's merged view + its qkv/o_proj slices reproduce TP1 decode
    attention for a request that was prefilled on replica 1."""
    hq, hkv, d, slots = 8, 4, 2, 6
    qkv, bias, o_proj = _weights(hq, hkv, d, seed=3)
    layout = HeadMajorLayout(hkv, slots, d)
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 5, 2, 4][:k]
    prompts = [torch.randn(n, HIDDEN, generator=gen) for n in lengths]
    pools = {"k": {}, "v": {}}
    for i, x in enumerate(prompts):  # TP1 prefill on replica i writes slots 0 .. len-1
        _, key, value = _project(x, qkv, bias, hq, hkv, d)
        for name, tensor in (("k", key), ("v", value)):
            pools[name][i] = layout.allocate(torch.float32)
            layout.tp1_view(pools[name][i])[: len(x)] = tensor
    plan = plan_transformation(range(k), 1, k, hkv, {i: [(0, n)] for i, n in enumerate(lengths)})
    for pool in pools.values():
        apply_plan(plan, pool)

    token = torch.randn(1, HIDDEN, generator=gen)  # next decode token of replica 1's request
    q, key, value = _project(token, qkv, bias, hq, hkv, d)  # TP1 reference
    _, k_ref, v_ref = _project(prompts[1], qkv, bias, hq, hkv, d)
    full = _gqa(q, torch.cat([k_ref, key]), torch.cat([v_ref, value])) @ o_proj.t()

    total = torch.zeros_like(full)
    merged_slots = torch.arange(lengths[1]) + 1 * slots  # request slots after merge
    for r in range(k):
        w, b = slice_qkv(qkv, hq, hkv, d, k, r), slice_qkv(bias, hq, hkv, d, k, r)
        q_r, k_new, v_new = _project(token, w, b, hq // k, hkv // k, d)
        k_cache = layout.merged_view(pools["k"][r], k)[merged_slots]
        v_cache = layout.merged_view(pools["v"][r], k)[merged_slots]
        local = _gqa(q_r, torch.cat([k_cache, k_new]), torch.cat([v_cache, v_new]))
        total += local @ slice_o_proj(o_proj, hq, hkv, d, k, r).t()
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq, hkv, k", [(4, 2, 2), (4, 4, 2), (8, 4, 4), (8, 2, 2)])
def test_rank_major_heads_undo_an_all_gather_of_owned_heads(hq, hkv, k):
    # OLMo2's QK-norm gathers every rank's heads; putting them back in model order must
    # give the unsharded projection exactly
    d, t = 3, 5
    full_q = torch.randn(t, hq, d)
    full_k = torch.randn(t, hkv, d)
    for full, kv in ((full_q, False), (full_k, True)):
        heads = full.shape[1]
        owned = [owned_kv_heads(hkv, k, r) if kv else owned_q_heads(hq, hkv, k, r)
                 for r in range(k)]
        gathered = torch.cat([full[:, o] for o in owned], dim=1)
        order = rank_major_heads(hq, hkv, k, kv=kv)
        assert sorted(order) == list(range(heads))
        inverse = torch.empty(heads, dtype=torch.int64)
        inverse[torch.tensor(order)] = torch.arange(heads)
        assert torch.equal(gathered[:, inverse], full)
