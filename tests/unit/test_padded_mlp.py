from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.padded_mlp import (
    DEFAULT_GRANULE_BYTES,
    PaddedMLP,
    PaddedMLPWeights,
    ShardGeometry,
)

HIDDEN, INTER, G = 16, 64, 8
GRANULE = 1024  # small granule so the tests see real padding: shard = 3*8*16*4 = 1536 B


def _dense(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    up = torch.randn(INTER, HIDDEN, generator=gen) / HIDDEN**0.5
    down = torch.randn(HIDDEN, INTER, generator=gen) / INTER**0.5
    return gate, up, down


def _reference(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def _weights(seed: int = 0, granule: int = GRANULE) -> PaddedMLPWeights:
    return PaddedMLPWeights(*_dense(seed), max_degree=G, granule_bytes=granule)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_partials_sum_to_dense_mlp(k: int) -> None:
    gate, up, down = _dense()
    mlp = PaddedMLPWeights(gate, up, down, max_degree=G, granule_bytes=GRANULE)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    total = sum(mlp.forward(x, k, r) for r in range(k))
    torch.testing.assert_close(total, _reference(x, gate, up, down), atol=1e-5, rtol=1e-5)


def test_from_fused_matches_separate() -> None:
    gate, up, down = _dense()
    fused = PaddedMLPWeights.from_fused(torch.cat([gate, up]), down, G, GRANULE)
    mlp = PaddedMLPWeights(gate, up, down, G, GRANULE)
    for s in range(G):
        assert torch.equal(fused.shard_buffer(s), mlp.shard_buffer(s))
    with pytest.raises(ValueError):
        PaddedMLPWeights.from_fused(torch.zeros(3, HIDDEN), down, G, GRANULE)


def test_shard_contents_and_views_are_views() -> None:
    gate, up, down = _dense()
    mlp = PaddedMLPWeights(gate, up, down, G, GRANULE)
    rows = INTER // G
    elem = 4
    assert mlp.shard_rows == rows
    for s in range(G):
        buf = mlp.shard_buffer(s)
        assert buf.dim() == 1 and buf.numel() * elem % GRANULE == 0
        gu, dt = mlp.gate_up(s), mlp.down_t(s)
        assert gu.shape == (2 * rows, HIDDEN) and dt.shape == (rows, HIDDEN)
        start, end = buf.data_ptr(), buf.data_ptr() + buf.numel() * elem
        for view in (gu, dt):
            assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
            assert start <= view.data_ptr() and view.data_ptr() + view.numel() * elem <= end
        assert dt.data_ptr() == start + 2 * rows * HIDDEN * elem
        cols = slice(s * rows, (s + 1) * rows)
        assert torch.equal(gu, torch.cat([gate[cols], up[cols]]))
        assert torch.equal(dt, down[:, cols].t())
        assert torch.all(buf[3 * rows * HIDDEN :] == 0)  # padding is zeroed
        gu[0, 0] = 42.0
        assert buf[0] == 42.0


def test_accounting() -> None:
    mlp = _weights()
    unpadded_shard = 3 * (INTER // G) * HIDDEN * 4  # 1536 B -> 2048 B padded
    assert mlp.unpadded_bytes == G * unpadded_shard == (2 * INTER * HIDDEN + HIDDEN * INTER) * 4
    assert mlp.padded_bytes == G * 2048
    assert mlp.padding_overhead == pytest.approx(2048 / 1536 - 1)
    assert mlp.resident_bytes == mlp.padded_bytes
    assert PaddedMLPWeights.padding_overhead_for(HIDDEN, INTER, G, 4, GRANULE) == pytest.approx(
        mlp.padding_overhead
    )
    # an exact fit has no padding; packing layers amortises it
    assert PaddedMLPWeights.padding_overhead_for(4096, 14336, 8, 2) == 0.0
    per_layer = PaddedMLPWeights.padding_overhead_for(3584, 18944, 8, 2)
    packed = PaddedMLPWeights.padding_overhead_for(3584, 18944, 8, 2, layers_per_buffer=28)
    assert 0 < packed < per_layer


def test_release_and_restore() -> None:
    mlp, donor = _weights(), _weights()
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(2))
    full = mlp.forward(x, 1, 0)
    shard_bytes = mlp.padded_bytes // G

    # merge to degree 4 as local rank 1: keep shards 1 and 5
    assert mlp.release_unowned(4, 1) == 6 * shard_bytes
    assert mlp.resident_shards() == [1, 5] == mlp.owned_shards(4, 1)
    assert mlp.resident_bytes == 2 * shard_bytes
    partial = mlp.forward(x, 4, 1)
    torch.testing.assert_close(partial, donor.forward(x, 4, 1), atol=0, rtol=0)
    with pytest.raises(ValueError, match="not resident"):
        mlp.forward(x, 2, 1)
    with pytest.raises(ValueError, match="not resident"):
        mlp.release([0])
    with pytest.raises(ValueError, match="not resident"):
        mlp.gate_up(3)
    with pytest.raises(ValueError, match="duplicate"):
        mlp.release([1, 1])

    # deeper: degree 8 as local rank 5 releases shard 1
    assert mlp.release_unowned(8, 5) == shard_bytes
    assert mlp.resident_shards() == [5]

    # split back to TP1: restore every missing shard from its owner's buffer
    assert mlp.missing_shards(1, 0) == [0, 1, 2, 3, 4, 6, 7]
    for s in mlp.missing_shards(1, 0):
        data = donor.shard_buffer(s).clone() if s % 2 else donor.shard_buffer(s)[: 3 * 8 * 16]
        mlp.restore(s, data)  # padded or unpadded payloads both work
    assert mlp.resident_bytes == mlp.padded_bytes
    assert torch.equal(mlp.forward(x, 1, 0), full)
    for s in range(G):
        assert torch.equal(mlp.shard_buffer(s), donor.shard_buffer(s))
    with pytest.raises(ValueError, match="already resident"):
        mlp.restore(0, donor.shard_buffer(0))


def test_release_is_all_or_nothing_and_restore_validates() -> None:
    mlp = _weights()
    mlp.release([3])
    with pytest.raises(ValueError):
        mlp.release([2, 3])
    assert 2 in mlp.resident_shards()
    with pytest.raises(ValueError, match="elements"):
        mlp.restore(3, torch.zeros(7))
    with pytest.raises(ValueError, match="dtype"):
        mlp.restore(3, torch.zeros(mlp.shard_buffer(0).numel(), dtype=torch.float64))
    with pytest.raises(ValueError, match="out of range"):
        mlp.release([G])


def test_adopt_installs_a_received_buffer_without_copying() -> None:
    mlp, donor = _weights(), _weights()
    mlp.release([2, 5])
    buf = mlp.allocate_shard(2)
    assert buf.shape == donor.shard_buffer(2).shape and not buf[3 * 8 * 16 :].any()
    buf[: 3 * 8 * 16].copy_(donor.shard_buffer(2)[: 3 * 8 * 16])  # what a peer would send
    mlp.adopt(2, buf)
    assert mlp.shard_buffer(2).data_ptr() == buf.data_ptr()
    assert torch.equal(mlp.shard_buffer(2), donor.shard_buffer(2))
    assert torch.equal(mlp.gate_up(2), donor.gate_up(2))
    with pytest.raises(ValueError, match="already resident"):
        mlp.adopt(2, mlp.allocate_shard(2))
    with pytest.raises(ValueError, match="allocate_shard"):
        mlp.adopt(5, torch.zeros(buf.numel() - 1))
    with pytest.raises(ValueError, match="allocate_shard"):
        mlp.adopt(5, torch.zeros(buf.numel(), dtype=torch.float64))
    assert mlp.missing_shards(1, 0) == [5]


def test_released_memory_is_really_dropped() -> None:
    mlp = _weights()
    buf = mlp.shard_buffer(6)
    ref = torch.utils.weak.WeakTensorKeyDictionary()
    ref[buf] = True
    del buf
    mlp.release([6])
    assert len(ref) == 0  # no hidden reference keeps the shard's storage alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_release_shrinks_rss_on_cpu() -> None:
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    hidden, inter, g = 512, 2048, 4  # shard: 3 MiB of float32 in a 4 MiB buffer
    weights = [torch.ones(inter, hidden), torch.ones(inter, hidden), torch.ones(hidden, inter)]
    mlp = PaddedMLPWeights(*weights, max_degree=g)
    del weights
    scratch = torch.ones(4 * 2**20)  # freeing a 16 MiB temporary raises glibc's mmap threshold
    del scratch
    for _ in range(2):  # twice: freeing must not depend on the allocator's history
        before = rss()
        assert mlp.release_unowned(g, g - 1) == 3 * 4 * 2**20  # keep the last allocated
        assert before - rss() >= 0.9 * 3 * 3 * 2**20
        for s in mlp.missing_shards(1, 0):
            mlp.restore(s, mlp.shard_buffer(g - 1))


def test_validation() -> None:
    gate, up, down = _dense()
    with pytest.raises(ValueError, match="not divisible"):
        PaddedMLPWeights(gate[:60], up[:60], down[:, :60], G)
    with pytest.raises(ValueError, match="power of two"):
        PaddedMLPWeights(gate, up, down, 3)
    with pytest.raises(ValueError, match="down"):
        PaddedMLPWeights(gate, up, down.t(), G)
    with pytest.raises(ValueError, match="granule"):
        PaddedMLPWeights(gate, up, down, G, granule_bytes=6)
    with pytest.raises(ValueError, match="dtype"):
        PaddedMLPWeights(gate, up.double(), down, G)
    with pytest.raises(ValueError, match="degree"):
        _weights().owned_shards(16, 0)


@settings(max_examples=25, deadline=None)
@given(
    hidden=st.integers(1, 40),
    rows=st.integers(1, 12),
    g_log=st.integers(0, 4),
    elem=st.sampled_from([1, 2, 4]),
    granule_elems=st.integers(1, 300),
)
def test_geometry_invariants(hidden: int, rows: int, g_log: int, elem: int, granule_elems: int):
    g = 1 << g_log
    geo = ShardGeometry.for_mlp(hidden, rows * g, g, elem, granule_elems * elem)
    assert geo.padded_nbytes % geo.granule_bytes == 0
    assert 0 <= geo.padded_nbytes - geo.nbytes < geo.granule_bytes
    assert DEFAULT_GRANULE_BYTES == 2 * 1024 * 1024


def test_bf16_ownership_nests() -> None:
    mlp = PaddedMLPWeights(*(w.bfloat16() for w in _dense()), max_degree=G)
    assert mlp.padded_bytes % DEFAULT_GRANULE_BYTES == 0
    for k in (1, 2, 4):
        for r in range(2 * k):
            assert set(mlp.owned_shards(2 * k, r)) <= set(mlp.owned_shards(k, r % k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_shards_sum_to_dense_and_release() -> None:
    gate, up, down = (w.cuda() for w in _dense())
    mlp = PaddedMLPWeights(gate, up, down, max_degree=G, granule_bytes=GRANULE)
    x = torch.randn(4, HIDDEN, device="cuda")
    total = sum(mlp.forward(x, 2, r) for r in range(2))
    torch.testing.assert_close(total, _reference(x, gate, up, down), atol=1e-4, rtol=1e-4)
    assert torch.all(mlp.shard_buffer(0)[3 * (INTER // G) * HIDDEN :] == 0)
    assert mlp.release_unowned(2, 0) == mlp.padded_bytes // 2


def test_forward_adds_shard_partials_in_ascending_order() -> None:
    """At degree 1 the output is ((P0 + P1) + P2) + ..., P_s = shard s alone: the same
    float sum a degree-G all-reduce of single-shard partials takes for G = 2."""
    mlp = _weights()
    x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(4))
    partials = [mlp.forward(x, G, s) for s in range(G)]
    expected = partials[0].clone()
    for p in partials[1:]:
        expected += p
    assert torch.equal(mlp.forward(x, 1, 0), expected)
    assert mlp.forward(x, 1, 0).shape == x.shape


def test_padded_mlp_binding() -> None:
    weights = _weights()
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    mlp = PaddedMLP(weights)
    assert (mlp.degree, mlp.local_rank) == (1, 0)
    assert torch.equal(mlp.forward(x), weights.forward(x, 1, 0))
    weights.release_unowned(4, 3)
    with pytest.raises(ValueError, match="not resident"):
        mlp.forward(x)  # still bound to degree 1: the released shards are missing
    mlp.set_degree(4, 3)
    assert torch.equal(mlp.forward(x), weights.forward(x, 4, 3))
    with pytest.raises(ValueError, match=r"shards \[0, 1, 2, 4, 5, 6\]"):
        mlp.set_degree(1, 0)
    assert (mlp.degree, mlp.local_rank) == (4, 3)  # a refused rebinding changes nothing
    with pytest.raises(ValueError, match="not resident"):
        PaddedMLP(weights, 2, 0)


@pytest.mark.parametrize("activation, act", [
    ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh")),
    ("gelu_none", F.gelu),
])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_gelu_gated_partials_sum_to_dense_mlp(activation, act, k: int) -> None:
    # Gemma's MLP: GELU (tanh-approximated in Gemma 2/3, exact in SGLang's Gemma 1) on the gate
    gate, up, down = _dense()
    mlp = PaddedMLPWeights(gate, up, down, G, GRANULE, activation=activation)
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(1))
    total = sum(mlp.forward(x, k, r) for r in range(k))
    want = (act(x @ gate.t()) * (x @ up.t())) @ down.t()
    torch.testing.assert_close(total, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(total, _reference(x, gate, up, down), atol=1e-3)


def test_unknown_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="activation"):
        PaddedMLPWeights(*_dense(), G, GRANULE, activation="relu")
