"""Issue 13: seeded sampling (temperature 0.8, ``sampling_seed``) moves across a live merge
and split with outputs equal to stock SGLang token for token.

SGLang honours ``sampling_seed`` only under ``--enable-deterministic-inference``, which
samples each token from (seed, position) and needs the Triton (or FA3/FA4/FlashInfer)
attention backend. Here both servers run that mode with Triton's interpreter on CPU
(float32); the test-only plugin ``gyges.testing.cpu_deterministic`` skips the one step of
the mode that needs CUDA or XPU (batch-invariant matmul kernels registered for those
devices only). Slow: the interpreter takes about 0.4 s a step.
"""
from __future__ import annotations

import pytest
import requests

from gyges.testing.clients import merge_and_split_through, start_streams
from gyges.testing.cpu_deterministic import ENV, PLUGIN
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA

pytestmark = pytest.mark.server

NEW_TOKENS = 40
# Deterministic Triton decoding splits the KV in fixed 256-token tiles up to the context
# length: the interpreter runs every split (128 at the tiny model's 32k), 3 s a step
ARGS = ["--attention-backend", "triton", "--enable-deterministic-inference",
        "--context-length", "2048"]
PROMPTS = [[(19 * i + 7 * j) % 400 + 5 for j in range(n)] for i, n in enumerate((9, 21, 9))]
# The first and third prompt are equal: only their seeds differ. No top_k / top_p: a batch
# with one such row samples every row from its sorted distribution, so a row's tokens
# would depend on its neighbours (SGLang's sampler; stock alike).
SAMPLING = [{"temperature": 0.8, "sampling_seed": seed} for seed in (1234, 77, 98765)]
EXTRAS = [{"sampling_params": s} for s in SAMPLING]


def _server(model: str, **kwargs) -> SGLangServer:
    srv = SGLangServer(model, extra_args=ARGS, **kwargs)
    srv.env["TRITON_INTERPRET"] = "1"
    srv.env[ENV] = "1"
    if not kwargs.get("gyges"):
        srv.env["SGLANG_PLUGINS"] = PLUGIN  # stock SGLang and the test plugin alone
    return srv


def test_seeded_sampling_moves_across_merge_and_split_equal_stock():
    model = tiny_model(LLAMA_GQA)
    with _server(model) as stock:
        threads, ref = start_streams(stock.url, [*PROMPTS, PROMPTS[0]], NEW_TOKENS,
                                     extras=[*EXTRAS, EXTRAS[0]], timeout_s=300)
        for t in threads:
            t.join(timeout=600)
        want = [ref[i][-1]["output_ids"] for i in range(len(PROMPTS))]
        # the seed decides: one prompt, two seeds, two outputs; one seed, one output
        assert want[0] != want[2]
        assert ref[len(PROMPTS)][-1]["output_ids"] == want[0]
    with _server(model, dp_size=2, gyges=True) as srv:
        info = requests.get(srv.url + "/server_info", timeout=30).json()
        assert info["attention_backend"] == "triton"
        assert info["enable_deterministic_inference"] is True
        threads, got = start_streams(srv.url, PROMPTS, NEW_TOKENS, min_chunks=3,
                                     extras=EXTRAS, timeout_s=300)
        merge_and_split_through(srv.url, threads, got)
        for i, w in enumerate(want):
            assert got[i][-1]["output_ids"] == w, f"seeded stream {i} differs from stock"
