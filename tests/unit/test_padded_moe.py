"""Padded per-expert shards (``gyges.core.padded_moe``): the partials of a degree-k group sum
to the dense MoE output, a merge's release frees every expert's slice at once, and a split's
restore brings the shards back bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.padded_moe import PaddedMoE

E, HIDDEN, INTER, G, TOP_K = 4, 16, 32, 4, 2
GRANULE = 1024


def _experts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    w2 = torch.randn(E, HIDDEN, INTER, generator=gen) / INTER**0.5
    return w13, w2


def _route(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    weights, ids = torch.softmax(logits, -1).topk(TOP_K, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), ids.to(torch.int32)


def _reference(x, weights, ids, w13, w2):
    """Each token's top-k experts, dense, weighted and summed (float64)."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = (x[t] @ w13[e].t()).chunk(2)
            out[t] += float(weights[t, j]) * ((F.silu(g) * u) @ w2[e].t())
    return out


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([1, 2, 4]), tokens=st.integers(1, 9), seed=st.integers(0, 999))
def test_partials_sum_to_the_dense_moe(k: int, tokens: int, seed: int) -> None:
    w13, w2 = _experts(seed)
    x, weights, ids = _route(tokens, seed + 1)
    ranks = [PaddedMoE.from_fused(w13, w2, G, GRANULE) for _ in range(k)]
    for r, moe in enumerate(ranks):
        moe.weights.release_unowned(k, r)
        moe.set_degree(k, r)
    total = sum(moe.forward(x, weights, ids).double() for moe in ranks)
    torch.testing.assert_close(total, _reference(x, weights, ids, w13, w2),
                               atol=1e-5, rtol=1e-5)


def test_release_frees_every_expert_and_restore_is_exact() -> None:
    w13, w2 = _experts()
    moe = PaddedMoE.from_fused(w13, w2, G, GRANULE)
    w = moe.weights
    before = {s: w.shard_buffer(s).clone() for s in range(G)}
    assert w.experts == E and w.geometry.numel == 3 * (INTER // G) * HIDDEN * E
    full = w.resident_bytes
    released = w.release_unowned(2, 1)
    assert released == full // 2 and w.resident_shards() == [1, 3]
    with pytest.raises(ValueError, match="not resident"):
        moe.set_degree(1, 0)
    for s in (0, 2):
        w.restore(s, before[s])
    moe.set_degree(1, 0)
    for s in range(G):
        assert torch.equal(w.shard_buffer(s), before[s])
    x, weights, ids = _route(5, 3)
    torch.testing.assert_close(moe.forward(x, weights, ids).double(),
                               _reference(x, weights, ids, w13, w2), atol=1e-5, rtol=1e-5)


def test_shard_holds_the_column_slice_of_every_expert() -> None:
    w13, w2 = _experts()
    w = PaddedMoE.from_fused(w13, w2, G, GRANULE).weights
    rows = INTER // G
    gate, up = w13.chunk(2, dim=1)
    for s in range(G):
        cols = slice(s * rows, (s + 1) * rows)
        assert torch.equal(w.gate_up(s), torch.cat([gate[:, cols], up[:, cols]], dim=1))
        assert torch.equal(w.down_t(s), w2[:, :, cols].transpose(1, 2))


def test_no_routed_tokens_and_bad_shapes() -> None:
    w13, w2 = _experts()
    moe = PaddedMoE.from_fused(w13, w2, G, GRANULE)
    empty = moe.forward(torch.zeros(0, HIDDEN), torch.zeros(0, TOP_K),
                        torch.zeros(0, TOP_K, dtype=torch.int32))
    assert empty.shape == (0, HIDDEN)
    with pytest.raises(ValueError, match="E, 2I, Hd"):
        PaddedMoE.from_fused(w13[0], w2, G, GRANULE)
    with pytest.raises(ValueError, match="computed by"):
        moe.weights.forward(torch.zeros(1, HIDDEN), 1, 0)
