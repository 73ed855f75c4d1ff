"""Scattering rows by runs (slices) writes exactly what one indexed copy writes."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gyges.comm import kv_transfer as kvt


@st.composite
def scatters(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    rows = draw(st.integers(8, 200))
    order = draw(st.permutations(range(rows // 4)))  # disjoint 4-row blocks, any order
    lengths = draw(st.lists(st.integers(1, 4), min_size=len(order), max_size=len(order)))
    dst = torch.tensor([b * 4 + i for b, n in zip(order, lengths, strict=True)
                        for i in range(n)], dtype=torch.int64)
    pos = None
    if draw(st.booleans()):
        mask = draw(st.lists(st.booleans(), min_size=dst.numel(), max_size=dst.numel()))
        pos = torch.nonzero(torch.tensor(mask, dtype=torch.bool)).flatten()
    return dst, pos, rows


@settings(max_examples=200, deadline=None)
@given(case=scatters(), min_run=st.sampled_from([1, 2, 3, 256]))
def test_runs_scatter_equals_index_copy(case, min_run: int) -> None:
    dst, pos, rows = case
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kvt, "MIN_RUN_ROWS", min_run)
        _check(dst, pos, rows, min_run)


def _check(dst: torch.Tensor, pos: torch.Tensor | None, rows: int, min_run: int) -> None:
    view = torch.randn(dst.numel(), 3)
    target = dst if pos is None else dst.index_select(0, pos)
    want = torch.zeros(rows, 3)
    want.index_copy_(0, target, view if pos is None else view.index_select(0, pos))
    runs = kvt.row_runs(target, pos)
    got = torch.zeros(rows, 3)
    if pos is None or runs is not None:
        kvt.scatter_rows(got, target, view, runs)
    else:
        got.index_copy_(0, target, view.index_select(0, pos))
    assert torch.equal(got, want)
    if runs is not None:
        assert sum(n for _, _, n in runs) == target.numel()
        assert len(runs) * min_run <= target.numel()


def test_contiguous_rows_are_one_run() -> None:
    assert kvt.row_runs(torch.arange(10, 1010)) == [(10, 0, 1000)]
    assert kvt.row_runs(torch.arange(0, 100)) is None  # below MIN_RUN_ROWS
