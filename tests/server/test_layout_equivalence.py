"""Head-major KV pool + padded MLP shards (--enable-gyges) against stock SGLang, DP2 on CPU.

Greedy outputs (float32, torch_native) must be token-identical to stock ``--dp-size 2`` for
three head layouts and page sizes 1 and 16. The padded MLP sums its shards' partials where
stock runs one GEMM over the intermediate dimension, so logprobs may differ in the last
float32 bits; the largest difference is printed and bounded (see docs/layout.md).

The stock reference runs once per model, with ``--page-size 1``, and serves both page
sizes. With torch_native the page size only decides which slots hold a token's K/V (reads
gather by slot, in token order), and the prompts share no first token, so no radix-cache
prefix is reused. Reusing the reference can only make a correct Gyges server fail, never a
wrong one pass; stock page 1 and 16 gave identical tokens and logprobs when checked by hand.
Requests go one at a time, so both servers see the same batches.
"""
from __future__ import annotations

import pytest
import requests

from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiers import ci_subset

MODELS = {
    "llama": dict(arch="llama", heads=8, kv_heads=8, head_dim=16),   # MHA, 8 KV heads
    "qwen2": dict(arch="qwen2", heads=8, kv_heads=4, head_dim=16),   # GQA 2:1, qkv bias
    "qwen3": dict(arch="qwen3", heads=4, kv_heads=2, head_dim=32),   # GQA 2:1, qk norm
}
PROMPT_LENS = (3, 17, 40, 100)  # within one page, across pages, many pages
NEW_TOKENS = 16
MAX_LOGPROB_DIFF = 1e-4
GYGES_ARGS = ("--gyges-granule-bytes", "65536")


def _prompts() -> list[list[int]]:
    # distinct first tokens: no request can reuse another's cached prefix
    return [[(7 * i + 13 * j) % 300 + 5 + i for j in range(n)]
            for i, n in enumerate(PROMPT_LENS)]


def _greedy(url: str) -> list[tuple[list[int], list[float]]]:
    out = []
    for ids in _prompts():
        r = requests.post(url + "/generate", timeout=120, json={
            "input_ids": ids, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                "ignore_eos": True},
        })
        r.raise_for_status()
        body = r.json()
        out.append((body["output_ids"],
                    [lp for lp, *_ in body["meta_info"]["output_token_logprobs"]]))
    return out


@pytest.fixture(scope="module")
def stock_outputs():
    cache: dict[str, list[tuple[list[int], list[float]]]] = {}

    def get(arch: str):
        if arch not in cache:
            with SGLangServer(tiny_model(**MODELS[arch]), dp_size=2, gyges=False,
                              extra_args=["--page-size", "1"]) as srv:
                cache[arch] = _greedy(srv.url)
        return cache[arch]

    return get


# CI: llama at page 1 and qwen3 at page 16; the other four pairs are the slow tier
@pytest.mark.parametrize("arch, page_size", ci_subset(
    [(a, p) for p in (1, 16) for a in MODELS], [("llama", 1), ("qwen3", 16)]),
    ids=[f"{a}-{p}" for p in (1, 16) for a in MODELS])
def test_head_major_padded_matches_stock(arch, page_size, stock_outputs, record_property):
    expected = stock_outputs(arch)
    with SGLangServer(tiny_model(**MODELS[arch]), dp_size=2, gyges=True,
                      extra_args=["--page-size", str(page_size), *GYGES_ARGS]) as srv:
        status = requests.get(srv.url + "/gyges/status", timeout=10).json()
        got = _greedy(srv.url)
    assert (status["kv_layout"], status["mlp_storage"]) == ("head_major", "padded")
    assert [ids for ids, _ in got] == [ids for ids, _ in expected]
    assert all(len(ids) == NEW_TOKENS for ids, _ in got)
    diff = max(abs(a - b) for (_, la), (_, lb) in zip(got, expected, strict=True)
               for a, b in zip(la, lb, strict=True))
    record_property("max_logprob_diff", diff)
    print(f"\n{arch} page {page_size}: max |logprob - stock| = {diff:.3g}")
    assert diff <= MAX_LOGPROB_DIFF
