"""``GYGES_FAULT_INJECT``: a spec fires once on its op, phase and rank; ``@file`` arms it late."""
from __future__ import annotations

import pytest

from gyges.switch import protocol


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(protocol, "_fired", set())


def test_fires_once_on_its_phase_and_rank(monkeypatch):
    monkeypatch.setenv(protocol.FAULT_ENV, "merge:kv_move:1,split:install:0")
    protocol.inject("merge", "kv_move", 0)
    protocol.inject("split", "kv_move", 1)
    with pytest.raises(RuntimeError, match="injected fault at merge kv_move"):
        protocol.inject("merge", "kv_move", 1)
    protocol.inject("merge", "kv_move", 1)  # once
    with pytest.raises(RuntimeError, match="split install"):
        protocol.inject("split", "install", 0)


def test_file_spec_is_read_at_every_phase(monkeypatch, tmp_path):
    path = tmp_path / "fault"
    monkeypatch.setenv(protocol.FAULT_ENV, f"@{path}")
    protocol.inject("merge", "prepare", 1)  # no file: nothing armed
    path.write_text("merge:prepare:1\n")
    with pytest.raises(RuntimeError):
        protocol.inject("merge", "prepare", 1)
