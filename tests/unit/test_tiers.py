"""The CI/slow split of parametrized server tests."""
from __future__ import annotations

import pytest

from gyges.testing.tiers import ci_subset


def test_cases_outside_ci_are_marked_slow():
    out = ci_subset(["a", "b", "c"], ["b"])
    assert out[1] == "b"
    slow = [p for p in out if not isinstance(p, str)]
    assert [p.values for p in slow] == [("a",), ("c",)]
    assert all(m.name == "slow" for p in slow for m in p.marks)


def test_a_ci_case_that_is_not_there_is_an_error():
    with pytest.raises(ValueError, match="renamed"):
        ci_subset(["a"], ["renamed"])


def test_tuple_cases_become_multi_argument_params():
    out = ci_subset([("a", 1), ("b", 2)], [("b", 2)])
    assert out[1] == ("b", 2)
    assert out[0].values == ("a", 1) and out[0].marks[0].name == "slow"
