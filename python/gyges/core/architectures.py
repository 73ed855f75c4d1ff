"""Which model architectures a Gyges host can transform, decided from ``config.json`` alone.

Checked right after argument parsing, before SGLang loads anything: an architecture the
transformation code does not cover (or a config whose layers it cannot reshard exactly) is
refused with one line naming the architecture, what is missing, and ``--enable-gyges`` as
the flag to drop, instead of failing at the first merge.

Supported: decoders whose layers have a fused QKV and an output projection without bias,
and a gated MLP (SiLU, or GELU for Gemma) without biases, or in every layer a SiLU mixture
of experts (Mixtral, Qwen3-MoE: per-expert padded shards); see :data:`SUPPORTED`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
             "Qwen3ForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM",
             "Glm4ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
             "InternLM2ForCausalLM", "MixtralForCausalLM", "Qwen3MoeForCausalLM")
# Mixture-of-experts architectures whose experts get padded per-expert shards.
MOE = ("MixtralForCausalLM", "Qwen3MoeForCausalLM")
# Gemma's MLP is GELU-gated (SGLang's module decides exact or tanh; the shards copy it).
GELU_GATED = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")

# Why some architectures people serve are refused (the rest: "not covered yet").
REASONS = {
    "Qwen2MoeForCausalLM": "its shared expert with a sigmoid gate is not covered yet "
                           "(Qwen3-MoE and Mixtral are)",
    "DeepseekV2ForCausalLM": "MoE experts and MLA attention are not covered yet",
    "DeepseekV3ForCausalLM": "MoE experts and MLA attention are not covered yet",
    "Llama4ForConditionalGeneration": "MoE experts (and layers without a dense MLP) are not "
                                      "covered yet",
    "Llama4ForCausalLM": "MoE experts (and layers without a dense MLP) are not covered yet",
    "Gemma3ForConditionalGeneration": "the vision tower and multimodal inputs are not "
                                      "covered (Gemma3ForCausalLM, text only, is)",
    "Gemma3nForCausalLM": "Gemma3n's per-layer inputs, AltUp and KV sharing are not covered",
}
# Architectures whose attention_bias (Llama: also "bias") puts a bias on o_proj.
O_PROJ_BIAS = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM",
               "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Qwen3MoeForCausalLM")
# Architectures that would take sliding-window layers from the config.
NO_SLIDING = ("MistralForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM",
              "Olmo2ForCausalLM", "MixtralForCausalLM")
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")


class UnsupportedArchitecture(ValueError):
    """The model cannot be transformed; the message is one line for the user."""


def check_architecture(config: Mapping[str, Any]) -> str:
    """The architecture of ``config`` (a parsed ``config.json``) if Gyges can transform it;
    else raise :class:`UnsupportedArchitecture`."""
    archs = list(config.get("architectures") or [])
    if len(archs) != 1:
        raise _refuse(str(archs or "no architectures"),
                      "config.json must name exactly one architecture")
    arch = archs[0]
    if arch not in SUPPORTED:
        raise _refuse(arch, REASONS.get(arch, "its layers are not covered yet"))
    text = config.get("text_config") or config
    moe = [k for k in MOE_KEYS if text.get(k)]
    if moe and arch not in MOE:
        raise _refuse(arch, f"MoE experts are not padded yet ({moe[0]} is set)")
    if arch in MOE:
        _check_moe(arch, text)
    if arch in O_PROJ_BIAS and (text.get("attention_bias") or text.get("bias")):
        raise _refuse(arch, "o_proj with a bias is not supported yet (attention_bias)")
    if arch in NO_SLIDING and (text.get("sliding_window")
                               or "sliding_attention" in (text.get("layer_types") or ())):
        raise _refuse(arch, "sliding-window attention is not covered yet (sliding_window)")
    if text.get("mlp_bias"):
        raise _refuse(arch, "MLP biases are not padded yet (mlp_bias)")
    act = text.get("hidden_act") or text.get("hidden_activation") or "silu"
    if arch not in GELU_GATED and act != "silu":
        raise _refuse(arch, f"only SiLU-gated MLPs are padded (hidden_act {act!r})")
    return arch


def check_shardable(config: Mapping[str, Any], max_tp: int) -> None:
    """Raise :class:`UnsupportedArchitecture` if the MLP (or each expert's) intermediate
    dimension cannot be cut into ``max_tp`` equal padded shards."""
    text = config.get("text_config") or config
    name = "moe_intermediate_size" if text.get("moe_intermediate_size") else \
        "intermediate_size"
    inter = text.get(name)
    if isinstance(inter, int) and inter % max_tp:
        archs = list(config.get("architectures") or ["the model"])
        raise UnsupportedArchitecture(
            f"--enable-gyges cannot shard {archs[0]}: {name} {inter} is not divisible by "
            f"the max TP degree {max_tp}; lower --gyges-max-tp or drop --enable-gyges")


def _check_moe(arch: str, text: Mapping[str, Any]) -> None:
    """Every layer sparse, no shared experts: what the padded experts cover."""
    if text.get("mlp_only_layers") or text.get("decoder_sparse_step", 1) != 1:
        raise _refuse(arch, "dense layers mixed with MoE layers are not covered yet "
                            "(mlp_only_layers / decoder_sparse_step)")
    if text.get("shared_expert_intermediate_size") or text.get("n_shared_experts"):
        raise _refuse(arch, "shared experts are not covered yet")


def _refuse(arch: str, why: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"--enable-gyges cannot transform {arch}: {why}; drop --enable-gyges to serve it "
        f"(supported: {', '.join(SUPPORTED)})")
