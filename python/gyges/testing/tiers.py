"""Test tiers: CI runs one case per mechanism; the other cases of a parametrized server test
are the ``slow`` tier (``bash scripts/test.sh -m slow``), so the suite stays inside CI's
90 minutes on a slow day. Imports pytest: for tests only."""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def ci_subset(cases: Iterable[Any], ci: Iterable[Any]) -> list[Any]:
    """``cases`` as parametrize values (a tuple is one case of a multi-argument
    parametrize); those not in ``ci`` carry the ``slow`` mark. Raises ValueError if ``ci``
    names a case that is not there (a renamed case would otherwise drop out of CI
    silently)."""
    cases, ci = list(cases), set(ci)
    missing = ci - set(cases)
    if missing:
        raise ValueError(f"CI cases {sorted(missing, key=repr)} are not among {cases}")
    return [c if c in ci else
            pytest.param(*(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
            for c in cases]
