from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.kv_layout import HeadMajorLayout, check_degree, gather_slots

DEGREES = [1, 2, 4, 8]


def _filled(layout: HeadMajorLayout) -> torch.Tensor:
    storage = layout.allocate(torch.float32, "cpu")
    storage.copy_(torch.arange(layout.numel, dtype=torch.float32).view(layout.shape))
    return storage


def test_allocate_shape_and_contiguity() -> None:
    layout = HeadMajorLayout(num_kv_heads=8, slots_per_replica=5, head_dim=3)
    storage = layout.allocate(torch.bfloat16, "cpu")
    assert storage.shape == (8, 5, 3)
    assert storage.dtype == torch.bfloat16
    assert storage.is_contiguous()
    assert layout.nbytes(2) == storage.numel() * storage.element_size()


def test_tp1_view_is_a_token_major_view() -> None:
    layout = HeadMajorLayout(num_kv_heads=4, slots_per_replica=6, head_dim=3)
    storage = _filled(layout)
    view = layout.tp1_view(storage)
    assert view.shape == (6, 4, 3)
    assert view.stride() == (3, 6 * 3, 1)
    assert view.data_ptr() == storage.data_ptr()
    assert torch.equal(view, storage.permute(1, 0, 2))
    view[2, 1] = -1.0  # writes through to head 1, slot 2
    assert torch.equal(storage[1, 2], torch.full((3,), -1.0))


@pytest.mark.parametrize("k", DEGREES)
def test_merged_view_geometry_and_content(k: int) -> None:
    layout = HeadMajorLayout(num_kv_heads=8, slots_per_replica=5, head_dim=2)
    storage = _filled(layout)
    view = layout.merged_view(storage, k)
    h, s, d = layout.shape
    assert view.shape == (k * s, h // k, d)
    assert view.stride() == (d, k * s * d, 1)
    assert view.data_ptr() == storage.data_ptr()
    for a in range(h // k):
        for i in range(k):
            # block (a, i) = storage[a*k + i]; merged slots i*S .. i*S + S - 1
            assert torch.equal(view[i * s : (i + 1) * s, a], storage[a * k + i])
    if k == 1:
        assert torch.equal(view, layout.tp1_view(storage))
        assert view.stride() == layout.tp1_view(storage).stride()


def test_merged_view_indexing_by_slot_tensor() -> None:
    # torch_native backends index buf[slot_indices]: must gather per merged slot.
    layout = HeadMajorLayout(num_kv_heads=4, slots_per_replica=3, head_dim=2)
    storage = _filled(layout)
    view = layout.merged_view(storage, 2)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(view[idx], torch.stack([view[5], view[0], view[3]]))


@pytest.mark.parametrize(
    ("k", "heads"), [(3, 8), (0, 8), (-2, 8), (16, 8), (4, 6), (2, 3), (True, 8), (2.0, 8)]
)
def test_bad_degrees_raise(k: object, heads: int) -> None:
    with pytest.raises(ValueError):
        check_degree(k, heads)  # type: ignore[arg-type]


def test_validation_errors() -> None:
    with pytest.raises(ValueError):
        HeadMajorLayout(num_kv_heads=0, slots_per_replica=4, head_dim=2)
    with pytest.raises(ValueError):
        HeadMajorLayout(num_kv_heads=4, slots_per_replica=4, head_dim=-1)
    layout = HeadMajorLayout(num_kv_heads=4, slots_per_replica=4, head_dim=2)
    with pytest.raises(ValueError, match="shape"):
        layout.tp1_view(torch.zeros(4, 4, 3))
    with pytest.raises(ValueError, match="contiguous"):
        layout.merged_view(torch.zeros(4, 2, 4).transpose(1, 2), 2)
    with pytest.raises(ValueError, match="power of two"):
        layout.merged_view(layout.allocate(torch.float32), 3)
    with pytest.raises(ValueError, match="does not divide"):
        layout.owned_heads(8, 0)
    with pytest.raises(ValueError, match="local rank"):
        layout.owned_heads(2, 2)
    with pytest.raises(ValueError):
        layout.block_of(4, 0, 2)
    with pytest.raises(ValueError):
        layout.head_of_block(-1, 2, 0)
    with pytest.raises(ValueError):
        layout.merged_slot(0, 4, 2)
    with pytest.raises(ValueError):
        layout.split_slot(8, 2)


def test_max_degree() -> None:
    assert HeadMajorLayout(8, 1, 1).max_degree() == 8
    assert HeadMajorLayout(28, 1, 1).max_degree() == 4
    assert HeadMajorLayout(3, 1, 1).max_degree() == 1


@settings(max_examples=40, deadline=None)
@given(heads_log=st.integers(0, 4), odd=st.sampled_from([1, 3, 5]), data=st.data())
def test_ownership_nests_and_partitions(heads_log: int, odd: int, data: st.DataObject) -> None:
    heads = (1 << heads_log) * odd
    layout = HeadMajorLayout(num_kv_heads=heads, slots_per_replica=2, head_dim=1)
    k = 1 << data.draw(st.integers(0, heads_log), label="log k")
    # the k ranks of a degree-k instance partition the heads
    owned = [layout.owned_heads(k, r) for r in range(k)]
    assert sorted(h for heads_r in owned for h in heads_r) == list(range(heads))
    for r in range(k):
        assert owned[r] == [a * k + r for a in range(heads // k)]
    if 2 * k <= layout.max_degree():
        for r2 in range(2 * k):
            # local rank r2 of a degree-2k group was local rank r2 % k of its degree-k sub-group
            assert set(layout.owned_heads(2 * k, r2)) <= set(owned[r2 % k])


@settings(max_examples=30, deadline=None)
@given(heads_log=st.integers(0, 4), data=st.data())
def test_block_addressing_round_trips(heads_log: int, data: st.DataObject) -> None:
    heads = 1 << heads_log
    layout = HeadMajorLayout(num_kv_heads=heads, slots_per_replica=3, head_dim=1)
    k = 1 << data.draw(st.integers(0, heads_log))
    seen = set()
    for r in range(k):
        for head in layout.owned_heads(k, r):
            for i in range(k):
                block = layout.block_of(head, i, k)
                assert layout.head_of_block(block, k, r) == head
                assert layout.replica_of_block(block, k) == i
                seen.add((r, block))
    assert len(seen) == k * heads  # every block of every rank used exactly once
    for i in range(k):
        for s in range(3):
            assert layout.split_slot(layout.merged_slot(i, s, k), k) == (i, s)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_gather_slots_matches_indexing_the_view(k: int) -> None:
    layout = HeadMajorLayout(num_kv_heads=4, slots_per_replica=10, head_dim=3)
    storage = torch.randn(layout.shape, generator=torch.Generator().manual_seed(k))
    view = layout.merged_view(storage, k)
    for dtype in (torch.int64, torch.int32):
        slots = torch.tensor([7, 0, 7, 10 * k - 1, 3], dtype=dtype)
        got = gather_slots(view, slots)
        assert torch.equal(got, view[slots])
        assert got.movedim(0, 1).is_contiguous()  # heads first, as attention reads it
    assert gather_slots(view, torch.tensor([], dtype=torch.int64)).shape == (0, 4 // k, 3)
    with pytest.raises(ValueError, match="not a head-major view"):
        gather_slots(storage.permute(1, 0, 2).contiguous(), torch.tensor([0]))
