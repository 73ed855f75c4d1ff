"""The CPU server environment: one OpenMP pool per core, however many ranks share them."""
from __future__ import annotations

import os

import pytest

from gyges.testing.server import cpu_env


@pytest.mark.parametrize("ranks", [1, 2, 4, 16])
def test_threads_split_the_usable_cores(monkeypatch: pytest.MonkeyPatch, ranks: int) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    env = cpu_env(ranks)
    assert env["OMP_NUM_THREADS"] == str(max(1, 4 // ranks))
    assert len(env["SGLANG_CPU_OMP_THREADS_BIND"].split("|")) == ranks


def test_a_thread_count_set_by_the_caller_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_env(2)["OMP_NUM_THREADS"] == "3"
