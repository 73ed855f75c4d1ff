"""Shared pytest setup: the ``server`` tier is the slow one (real SGLang on CPU)."""
from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/server/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.server)
