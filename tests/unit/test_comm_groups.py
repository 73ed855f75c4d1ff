from __future__ import annotations

import pytest

from gyges.comm.groups import aligned_groups, group_of, pool_degrees, validate_group
from gyges.control.channel import ControlError


def test_aligned_groups_partition_the_ranks():
    assert aligned_groups(4, 2) == [(0, 1), (2, 3)]
    assert aligned_groups(4, 4) == [(0, 1, 2, 3)]
    assert aligned_groups(8, 1) == [(r,) for r in range(8)]
    for n, k in [(8, 2), (8, 4), (8, 8), (16, 4)]:
        groups = aligned_groups(n, k)
        assert sorted(r for g in groups for r in g) == list(range(n))
        assert all(group_of(r, k) == g for g in groups for r in g)
    with pytest.raises(ValueError):
        aligned_groups(6, 4)


def test_pool_degrees():
    assert pool_degrees(1) == ()
    assert pool_degrees(2) == (2,)
    assert pool_degrees(8) == (2, 4, 8)


@pytest.mark.parametrize("ranks", [[0, 1], [3, 2], (0, 1, 2, 3), [4, 5, 6, 7], [6, 7]])
def test_validate_group_accepts_aligned_groups(ranks):
    assert validate_group(ranks, 8, 4 if len(ranks) <= 4 else 8) == tuple(sorted(ranks))


@pytest.mark.parametrize("ranks, message", [
    ([1, 2], "not an aligned group; aligned groups of 2 ranks are [0, 1], [2, 3]"),
    ([0], "at least 2 ranks"),
    ([], "at least 2 ranks"),
    ([0, 9], "unknown rank(s) [9]: this host has ranks 0..3"),
    ([-1, 0], "unknown rank(s) [-1]"),
    ([0, 1, 2], "a group of 3 ranks is not allowed"),
    ([0, 0], "duplicates"),
    ("01", "must be a list of integers"),
    ([0, "1"], "must be a list of integers"),
    ([True, False], "must be a list of integers"),
    (None, "must be a list of integers"),
    ({"0": 1}, "must be a list of integers"),
])
def test_validate_group_rejects_with_a_message(ranks, message):
    with pytest.raises(ControlError) as e:
        validate_group(ranks, 4, 4)
    assert message in str(e.value) and e.value.status == 400


def test_validate_group_respects_max_tp():
    with pytest.raises(ControlError, match="--gyges-max-tp 2"):
        validate_group([0, 1, 2, 3], 4, 2)
