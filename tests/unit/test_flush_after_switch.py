"""After a switch the next overlapped step's result is processed before the one after it
launches: once, only when there is a batch and a last batch, never against SGLang's own
decision."""
from __future__ import annotations

from types import SimpleNamespace

from gyges.hooks.scheduler import after_is_disable_overlap_for_batch as hook


def _scheduler(flag: bool) -> SimpleNamespace:
    return SimpleNamespace(_gyges_member=SimpleNamespace(rank=0, flush_after_switch=flag))


def test_flushes_once_after_a_switch() -> None:
    s = _scheduler(True)
    assert hook(False, s, None, last_batch=None) is None  # first step: nothing to flush yet
    assert hook(False, s, "b1", last_batch=None) is None
    assert s._gyges_member.flush_after_switch
    assert hook(False, s, "b2", last_batch="b1") is True
    assert not s._gyges_member.flush_after_switch
    assert hook(False, s, "b3", last_batch="b2") is None  # the pipeline overlaps again


def test_leaves_sglang_alone_without_a_switch() -> None:
    assert hook(False, _scheduler(False), "b2", last_batch="b1") is None
    assert hook(True, _scheduler(False), "b2", last_batch="b1") is None  # its own True stays
    assert hook(False, SimpleNamespace(), "b2", last_batch="b1") is None  # not a Gyges rank
