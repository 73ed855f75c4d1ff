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


def test_members_leave_a_switch_with_one_scheduling_state(monkeypatch) -> None:
    """SGLang admits prefills and retracts decodes against its new-token ratio, orders an
    HRRN queue by its prefill-token counter and refreshes waiting prefixes' LRU every 32
    calls, and under --prefill-decode-interval counts decode rounds down to the next prefill:
    TP ranks that differ in any of these schedule different batches and their next
    all-reduce mismatches (seen: a merge after one replica's retraction, gloo "76800 vs
    256", the host down). Every member keeps the highest ratio, prefill-token count and
    rounds left, and the leader's step counter and refresh count."""
    import json

    from gyges.switch import member

    ratios, forward, processed, refresh = [0.7, 0.51, 0.098], [40, 7, 12], [5, 900, 30], [3, 64, 9]
    interval = [0, 4, 2]
    states = [{"forward_ct": f, "ratio": r, "processed": p, "refresh": c, "interval": i}
              for f, r, p, c, i in zip(forward, ratios, processed, refresh, interval,
                                       strict=True)]

    def gather(_group, data, _timeout):
        assert json.loads(data) in states
        return [json.dumps(st).encode() for st in states]

    monkeypatch.setattr(member, "all_gather_bytes", gather)
    for rank in range(3):
        s = SimpleNamespace(forward_ct=forward[rank],
                            new_token_ratio_tracker=SimpleNamespace(current=ratios[rank]),
                            processed_tokens_counter=processed[rank],
                            policy=SimpleNamespace(_waiting_prefix_refresh_calls=refresh[rank]),
                            _prefill_decode_interval_remaining=interval[rank])
        member.GroupMember._sync_counters(SimpleNamespace(s=s), object(), seed=3)
        assert (s.forward_ct, s.new_token_ratio_tracker.current, s.processed_tokens_counter,
                s.policy._waiting_prefix_refresh_calls,
                s._prefill_decode_interval_remaining) == (40, 0.7, 900, 3, 4)
