"""SGLang's Triton attention backend under Triton's interpreter (``TRITON_INTERPRET=1``,
float32 on CPU): live merge and split with streams in flight, equal to stock SGLang on the
same backend token for token, the transformation meeting live work (``requests_moved``).
Two small cases (the interpreter takes about 0.4 s a step): GQA with head_dim != hidden /
heads at page size 1, and MHA-per-KV-pair at page size 16."""
from __future__ import annotations

import pytest
import requests

from gyges.testing.clients import merge_and_split_through, start_streams, stream_generate
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiers import ci_subset

PROMPTS = [[(17 * i + 5 * j) % 400 + 5 for j in range(n)] for i, n in enumerate((7, 19, 33))]
NEW_TOKENS = 40
TRITON = ["--attention-backend", "triton"]

CASES = {
    # 4 q heads per KV head; head_dim 24 (hidden 128 / 8 heads = 16): not a power of two
    "gqa-head-dim-24-page1": ({"heads": 8, "kv_heads": 2, "head_dim": 24}, []),
    "page16": ({"heads": 4, "kv_heads": 2}, ["--page-size", "16"]),
}


def _interpreted(srv: SGLangServer) -> SGLangServer:
    srv.env["TRITON_INTERPRET"] = "1"
    return srv


# CI: the GQA case (head_dim not a power of two); page 16 is the slow tier (2 min each)
@pytest.mark.parametrize("case", ci_subset(CASES, ["gqa-head-dim-24-page1"]))
def test_triton_backend_merge_and_split_equal_stock(case):
    fields, args = CASES[case]
    model = tiny_model(arch="llama", **fields)
    with _interpreted(SGLangServer(model, extra_args=[*TRITON, *args])) as stock:
        want = [stream_generate(stock.url, p, NEW_TOKENS)[-1]["output_ids"] for p in PROMPTS]
    with _interpreted(SGLangServer(model, dp_size=2, gyges=True,
                                   extra_args=[*TRITON, *args])) as srv:
        info = requests.get(srv.url + "/server_info", timeout=30).json()
        assert info["attention_backend"] == "triton"
        threads, got = start_streams(srv.url, PROMPTS, NEW_TOKENS, min_chunks=3,
                                     timeout_s=300)
        merge_and_split_through(srv.url, threads, got)
        for i, w in enumerate(want):
            assert got[i][-1]["output_ids"] == w, f"{case} stream {i} differs from stock"

