"""`gyges.core.triton_bounds`: the largest element offset SGLang's Triton attention kernels
compute on a head-major view, and the int32 check on it (plain math; meta tensors, no memory)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.core.kv_layout import HeadMajorLayout
from gyges.core.triton_bounds import (
    INT32_MAX,
    check_triton_offsets,
    triton_max_offset,
    triton_max_slots,
)


def _view_max_offset(layout: HeadMajorLayout, k: int) -> int:
    """Last element's offset through the actual merged view (meta tensor: no memory)."""
    view = layout.merged_view(layout.allocate(torch.float16, "meta"), k)
    return sum((n - 1) * s for n, s in zip(view.shape, view.stride(), strict=True))


@settings(max_examples=200, deadline=None)
@given(log_h=st.integers(0, 6), odd=st.sampled_from([1, 3, 5]), s=st.integers(1, 1 << 26),
       log_d=st.integers(0, 9), extra_d=st.sampled_from([0, 8, 32]), log_k=st.integers(0, 6))
def test_max_offset_is_last_storage_element_at_every_degree(
        log_h: int, odd: int, s: int, log_d: int, extra_d: int, log_k: int) -> None:
    layout = HeadMajorLayout(odd << log_h, s, (1 << log_d) + extra_d)
    k = 1 << min(log_k, log_h)
    got = triton_max_offset(layout, k)
    assert got == layout.numel - 1 == _view_max_offset(layout, k)
    h, _, d = layout.shape
    assert (h - k) * s * d <= got  # the int32 head term never exceeds the bound checked
    if got <= INT32_MAX:
        check_triton_offsets(layout)
    else:
        with pytest.raises(ValueError, match=f"H={h} KV heads x S={s} slots x D={d}"):
            check_triton_offsets(layout)


@pytest.mark.parametrize("h, d", [(1, 1), (2, 128), (8, 128), (4, 96), (40, 128)])
def test_max_slots_is_the_exact_boundary(h: int, d: int) -> None:
    s = triton_max_slots(h, d)
    check_triton_offsets(HeadMajorLayout(h, s, d))
    assert h * s * d <= 2**31 < h * (s + 1) * d
    with pytest.raises(ValueError, match=f"at most {s} slots per replica"):
        check_triton_offsets(HeadMajorLayout(h, s + 1, d))


def test_invalid_degree_and_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        triton_max_offset(HeadMajorLayout(4, 8, 16), 8)
    with pytest.raises(ValueError):
        triton_max_offset(HeadMajorLayout(6, 8, 16), 4)
    with pytest.raises(ValueError):
        triton_max_slots(0, 128)
