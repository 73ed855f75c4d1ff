"""Cost model arithmetic: model sizes, roofline terms, memory plans, transformation bytes."""
from __future__ import annotations

import json

import pytest

from gyges.sim.cost import CostParams, MemoryPlan, StepCost, TransformCost
from gyges.sim.gpus import BUILTIN as GPUS
from gyges.sim.models import BUILTIN as MODELS
from gyges.sim.models import SimInputError, model_from_hf

H100 = CostParams.for_gpu(GPUS["h100"])
L8B = MODELS["llama-3-8b"]
Q32 = MODELS["qwen2.5-32b"]


def test_model_sizes_match_published_parameter_counts():
    assert L8B.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    assert abs(L8B.params / 1e9 - 8.03) < 0.01
    assert abs(MODELS["llama-3-70b"].params / 1e9 - 70.55) < 0.05
    assert abs(Q32.params / 1e9 - 32.76) < 0.05  # without q/k/v biases


def test_hf_config_is_read(tmp_path):
    cfg = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
           "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    m = model_from_hf(tmp_path)
    assert (m.layers, m.head_dim, m.kv_heads, m.embed_params) == (2, 16, 2, 6400)
    with pytest.raises(SimInputError):
        model_from_hf(tmp_path / "missing")


def test_decode_step_is_the_roofline_sum():
    p = H100.with_(step_overhead_s=0.001, layer_overhead_s=0.0)
    c = StepCost(L8B, p)
    lin = (L8B.params - L8B.vocab * L8B.hidden) * 2 / (p.hbm_bw * p.mbu)  # memory-bound
    attn = L8B.kv_bytes_per_token * 1000 / (p.hbm_bw * p.mbu)
    assert c.decode(1, 1, 1000) == pytest.approx(0.001 + lin + attn, rel=1e-3)
    # TP2 halves the bytes per GPU and adds 2 all-reduces per layer, each >= the floor.
    t2 = c.decode(2, 1, 1000)
    floor = 2 * L8B.layers * p.allreduce_latency_s
    assert t2 == pytest.approx(0.001 + (lin + attn) / 2 + floor, rel=1e-2)
    assert c.decode(1, 0, 0) == 0.0


def test_prefill_is_compute_bound_and_chunked():
    c = StepCost(L8B, H100)
    one = c.prefill(1, 8192, 8192**2 / 2, 1)
    two = c.prefill(1, 16384, 2 * 8192**2 / 2, 2)
    assert two == pytest.approx(2 * one, rel=1e-6)  # two chunks of the same work
    assert c.prefill(2, 8192, 8192**2 / 2, 1) < one


def test_memory_plan_capacity_grows_faster_than_k_under_gyges_only():
    plan = MemoryPlan(Q32, H100, 8)
    free1 = H100.memory * H100.mem_fraction - Q32.weight_bytes
    assert plan.static(1) == int(free1 // Q32.kv_bytes_per_token)
    for k in (2, 4, 8):
        assert plan.gyges(k) > k * plan.gyges(1)
        assert plan.flying(k) == k * plan.flying(1)
        assert plan.static(k) > plan.gyges(k)  # attention stays duplicated under Gyges
    # Padded shards cost at most a granule per shard per layer.
    assert 0 <= plan.padded_mlp_bytes - Q32.mlp_bytes <= 8 * Q32.layers * 2**21


def test_transformation_bytes_come_from_the_transfer_plan():
    plan = MemoryPlan(L8B, H100, 8)
    tc = TransformCost(L8B, H100, plan)
    per_token_head = L8B.head_dim * 2 * 2 * L8B.layers  # K and V of every layer
    # TP1+TP1 -> TP2: each rank sends the half of its heads that the other now owns.
    assert tc.kv_bytes_per_gpu(2, 1, 2, [1000, 1000]) == 4 * 1000 * per_token_head
    total, paused, nbytes = tc.duration("merge", 1, 2, [1000, 1000])
    assert nbytes == 4 * 1000 * per_token_head  # 0 weight bytes
    assert total == paused == pytest.approx(H100.transform_fixed_s + nbytes / H100.nvlink_bw)
    # A split moves the KV back and restores half of the padded MLP on each GPU.
    _, _, split_bytes = tc.duration("split", 2, 1, [1000, 1000])
    assert split_bytes == nbytes + plan.padded_mlp_bytes // 2
    overlapped = TransformCost(L8B, H100.with_(overlap=0.75), plan)
    t, p, _ = overlapped.duration("merge", 1, 2, [1000, 1000])
    assert t == pytest.approx(total) and p == pytest.approx(
        H100.transform_fixed_s + 0.25 * nbytes / H100.nvlink_bw)


def test_configured_kv_slots_override_the_memory_plan():
    plan = MemoryPlan(Q32, H100.with_(kv_tokens_tp1=1000), 8)
    assert [plan.static(k) for k in (1, 2, 8)] == [1000, 2000, 8000]
    assert plan.gyges(4) == plan.flying(4) == 4000 and plan.shift(8) == 8000
