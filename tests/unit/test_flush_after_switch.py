"""After a switch the next overlapped step's result is processed before the one after it
launches: once, only when there is a batch and a last batch, never against SGLang's own
decision. And the switch publishes the member's new load."""
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


def test_the_switch_publishes_the_new_load_and_survives_a_failed_publish(caplog) -> None:
    """At the end of a switch each member publishes its load (forced), so that the reply
    and the controller see the new instance; a publish that raises is logged, not fatal
    (the switch is committed by then)."""
    from gyges.switch.member import _publish_load

    calls: list[bool] = []
    _publish_load(SimpleNamespace(publish_load_snapshot=lambda force: calls.append(force)))
    assert calls == [True]

    def broken(force: bool) -> None:
        raise RuntimeError("no snapshot writer")

    _publish_load(SimpleNamespace(publish_load_snapshot=broken, dp_rank=1))
    assert "could not publish its load" in caplog.text
