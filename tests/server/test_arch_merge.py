"""Live merge and split of the other accepted architectures (Qwen2: qkv bias; Qwen3:
QK-norm; Mistral: SGLang's Llama subclass, no sliding window; Phi-3: fused qkv/gate_up in the
checkpoint; Granite: muP multipliers, MLP that sums itself; OLMo2: QK-norm over all heads;
GLM-4: qkv bias, partial rotary, post-norms; Gemma 1/2/3: GELU MLP, soft-capping, sliding
windows; Mixtral and Qwen3-MoE: per-expert padded shards, replicated router), dp 2,
streams in flight: outputs equal stock SGLang on one replica, token for token, the
transformation met live work (``requests_moved``) and the streams decoded while
merged (the TP2 computation is what is compared, not only the moves)."""
from __future__ import annotations

import pytest
import requests

from gyges.testing.clients import (
    stream_generate,
    transform_meeting_streams,
    wait_for_more_chunks,
)
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiers import ci_subset

PROMPTS = [[(13 * i + 7 * j) % 400 + 5 for j in range(n)] for i, n in enumerate((11, 30, 6, 45))]
NEW_TOKENS = 400  # compared with stock, token for token
# what the streams run: three times the compared tokens, so the merge and the split meet
# them running even where the test client is starved for CPU and sees its chunks late (a
# CI run saw 4 streams of 400 end before the merge); greedy outputs of a longer request
# begin with the shorter one's
STREAM_TOKENS = 3 * NEW_TOKENS


# id -> (tiny model arch, spec fields beyond heads=4/kv_heads=2, server args for both servers)
CASES = {
    "qwen2": ("qwen2", {}, []),
    "qwen3": ("qwen3", {}, []),
    "mistral": ("mistral", {}, []),
    "phi3": ("phi3", {"seed": 1}, []),
    "granite": ("granite", {}, []),
    "olmo2": ("olmo2", {}, []),
    "glm4": ("glm4", {}, []),
    "internlm2": ("internlm2", {}, ["--trust-remote-code"]),
    "gemma": ("gemma", {}, []),
    "gemma2": ("gemma2", {}, []),
    "gemma3": ("gemma3", {}, []),
    "mixtral": ("mixtral", {}, []),
    "qwen3-moe": ("qwen3_moe", {}, []),
    # GQA (4 q heads per KV head) with pages of 16 slots: moves and compaction in pages
    "llama-gqa-page16": ("llama", {"heads": 8, "kv_heads": 2, "head_dim": 16},
                         ["--page-size", "16"]),
    # head_dim 64 != hidden 128 / 4 heads (as in Qwen3 checkpoints). Seed 1: with seed 0,
    # stock's own top-2 logprob margin at token 390 of prompt 2 is 4.8e-7 (a float tie) and
    # the rounding of the TP2 attention sum flips it (Gyges at TP1 without a merge matched)
    "qwen3-head-dim-64": ("qwen3", {"head_dim": 64, "seed": 1}, []),
}


# CI runs one architecture per mechanism (QK-norm with head_dim != hidden/heads, fused
# checkpoint weights, GELU with sliding windows and soft-capping, MoE shards, pages with
# GQA); the others are the slow tier (`bash scripts/test.sh -m slow`), 1-2 minutes each
CI_CASES = {"qwen3-head-dim-64", "phi3", "gemma3", "mixtral", "llama-gqa-page16"}


@pytest.mark.parametrize("case", ci_subset(CASES, CI_CASES))
def test_merge_and_split_with_streams_equal_stock(case):
    arch, fields, args = CASES[case]
    model = tiny_model(arch=arch, **{"heads": 4, "kv_heads": 2, **fields})
    with SGLangServer(model, extra_args=args) as stock:
        want = [stream_generate(stock.url, p, NEW_TOKENS)[-1]["output_ids"] for p in PROMPTS]
    with SGLangServer(model, dp_size=2, gyges=True, extra_args=args) as srv:
        threads, got, merged = transform_meeting_streams(srv.url, [0, 1], PROMPTS,
                                                         STREAM_TOKENS, min_running=2)
        released = merged["weight_bytes_released"]  # the unowned MLP/expert shards
        assert released > 0, merged
        wait_for_more_chunks(got, 8)
        r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["requests_moved"]["running"] >= 1, r.json()["requests_moved"]
        # the shards come back from their holders (unpadded bytes on the wire)
        assert 0 < r.json()["weight_bytes_restored"] <= released, r.json()
        for t in threads:
            t.join(timeout=300)
        for i, w in enumerate(want):
            out = got[i][-1]["output_ids"]
            assert len(out) == STREAM_TOKENS
            assert out[:NEW_TOKENS] == w, f"{case} stream {i} differs from stock"
            assert got[i][-1]["meta_info"]["num_retractions"] == 0

