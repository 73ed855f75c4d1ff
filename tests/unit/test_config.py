from __future__ import annotations

import pytest

from gyges.config import GygesConfig, GygesConfigError


def build(**kw):
    args = dict(enabled=True, tp_size=1, dp_size=4, max_tp=None, policy="gyges", num_kv_heads=8)
    args.update(kw)
    return GygesConfig.build(**args)


def test_default_max_tp_is_dp_size_capped_by_kv_heads():
    assert build().max_tp == 4
    assert build(dp_size=8, num_kv_heads=2).max_tp == 2
    assert build(dp_size=6, num_kv_heads=8).max_tp == 2  # largest power of two dividing 6
    assert build(dp_size=1).max_tp == 1


def test_degrees():
    assert build(max_tp=4).degrees == (1, 2, 4)


@pytest.mark.parametrize("kw, message", [
    (dict(tp_size=2), "requires --tp-size 1"),
    (dict(max_tp=3), "power of two"),
    (dict(max_tp=8, dp_size=4), "larger than --dp-size"),
    (dict(max_tp=4, num_kv_heads=2), "larger than the model's 2 KV heads"),
    (dict(max_tp=4, dp_size=6), "multiple of --gyges-max-tp"),
    (dict(policy="nope"), "--gyges-policy"),
    (dict(granule_bytes=1000), "granule"),
])
def test_invalid_combinations(kw, message):
    with pytest.raises(GygesConfigError, match=message.replace("-", r"\-")):
        build(**kw)


def test_disabled_skips_validation():
    cfg = GygesConfig.build(enabled=False, tp_size=4, dp_size=1, max_tp=3, policy="gyges",
                            num_kv_heads=0)
    assert not cfg.enabled


def test_frozen():
    with pytest.raises(AttributeError):
        build().max_tp = 2  # type: ignore[misc]
