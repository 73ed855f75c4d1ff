"""Server fixtures for the server tier (each start costs 30-60 s on 2 idle cores).

Module-scoped: a server lives only while its test file runs, so no idle server competes
for the two cores with the next file's servers."""
from __future__ import annotations

import pytest

from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA


@pytest.fixture(scope="module")
def llama_gyges():
    """A `--dp-size 2 --enable-gyges --enable-metrics` server on the tiny llama (max 4096 KV
    tokens/replica). Metrics on: requests then hold Prometheus collectors, which a live
    merge must not try to move."""
    with SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True,
                      extra_args=["--enable-metrics"]) as srv:
        yield srv
