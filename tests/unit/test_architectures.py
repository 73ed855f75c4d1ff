"""The startup check of the architecture (``gyges.core.architectures``)."""
from __future__ import annotations

import json

import pytest

from gyges.core.architectures import (
    SUPPORTED,
    UnsupportedArchitecture,
    check_architecture,
    check_shardable,
)
from gyges.testing.server import tiny_model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "phi3", "granite",
                                  "olmo2", "glm4", "internlm2", "gemma", "gemma2", "gemma3",
                                  "mixtral", "qwen3_moe"])
def test_the_tiny_models_pass(arch):
    cfg = json.loads((tiny_model(arch=arch) / "config.json").read_text())
    assert check_architecture(cfg) in SUPPORTED


@pytest.mark.parametrize("config, why", [
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "shared expert"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8, "mlp_only_layers": [1]},
     "dense layers mixed with MoE layers"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "decoder_sparse_step": 2},
     "decoder_sparse_step"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": True}, "o_proj with a bias"),
    ({"architectures": ["MixtralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "MLA attention"),
    ({"architectures": ["Llama4ForConditionalGeneration"]}, "layers without a dense MLP"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "vision tower"),
    ({"architectures": ["Gemma3nForCausalLM"]}, "AltUp"),
    ({"architectures": ["Gemma2ForCausalLM"], "attention_bias": True}, "o_proj with a bias"),
    ({"architectures": ["Olmo2ForCausalLM"], "attention_bias": True}, "o_proj with a bias"),
    ({"architectures": ["Phi3ForCausalLM"], "sliding_window": 2047}, "sliding_window"),
    ({"architectures": ["Olmo2ForCausalLM"], "layer_types": ["sliding_attention"]},
     "sliding_window"),
    ({"architectures": ["GraniteForCausalLM"], "hidden_act": "gelu"}, "SiLU"),
    ({"architectures": ["FooForCausalLM"]}, "not covered yet"),
    ({}, "exactly one architecture"),
    ({"architectures": ["LlamaForCausalLM"], "num_local_experts": 8}, "num_local_experts"),
    ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "o_proj with a bias"),
    ({"architectures": ["LlamaForCausalLM"], "mlp_bias": True}, "mlp_bias"),
    ({"architectures": ["Qwen2ForCausalLM"], "hidden_act": "gelu"}, "SiLU"),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window"),
])
def test_refusals_are_one_line_with_the_flag_to_drop(config, why):
    with pytest.raises(UnsupportedArchitecture) as e:
        check_architecture(config)
    msg = str(e.value)
    assert why in msg and "drop --enable-gyges" in msg and "\n" not in msg, msg


def test_qwen2_attention_bias_is_fine():
    # Qwen2's qkv bias is resharded; only Llama's attention_bias adds an o_proj bias
    assert check_architecture({"architectures": ["Qwen2ForCausalLM"],
                               "attention_bias": True}) == "Qwen2ForCausalLM"


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_gemma_gelu_is_fine(act):
    # the padded shards take the activation from SGLang's module (exact or tanh GELU)
    for arch in ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"):
        assert check_architecture({"architectures": [arch], "hidden_act": act}) == arch


@pytest.mark.parametrize("config, max_tp, why", [
    ({"architectures": ["LlamaForCausalLM"], "intermediate_size": 300}, 8, "intermediate_size 300"),
    ({"architectures": ["Qwen3MoeForCausalLM"], "intermediate_size": 256,
      "moe_intermediate_size": 96}, 64, "moe_intermediate_size 96"),
])
def test_intermediate_not_divisible_by_max_tp_is_refused(config, max_tp, why):
    with pytest.raises(UnsupportedArchitecture) as e:
        check_shardable(config, max_tp)
    assert why in str(e.value) and "--gyges-max-tp" in str(e.value)


def test_divisible_intermediate_is_fine():
    check_shardable({"architectures": ["MixtralForCausalLM"], "intermediate_size": 256}, 4)
    check_shardable({"architectures": ["Qwen3MoeForCausalLM"], "intermediate_size": 300,
                     "moe_intermediate_size": 256}, 8)
