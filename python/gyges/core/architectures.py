"""Which model architectures a Gyges host can transform, decided from ``config.json`` alone.

Checked right after argument parsing, before SGLang loads anything: an architecture the
transformation code does not cover (or a config whose layers it cannot reshard exactly) is
refused with one line naming the architecture, what is missing, and ``--enable-gyges`` as
the flag to drop, instead of failing at the first merge.

Supported: dense decoders whose layers have a fused QKV and an output projection without
bias, and a gated MLP (SiLU, or GELU for Gemma) without biases; see :data:`SUPPORTED`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
             "Qwen3ForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM", "Olmo2ForCausalLM",
             "Glm4ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
             "InternLM2ForCausalLM")
# Gemma's MLP is GELU-gated (SGLang's module decides exact or tanh; the shards copy it).
GELU_GATED = ("GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")

# Why some architectures people serve are refused (the rest: "not covered yet").
REASONS = {
    "MixtralForCausalLM": "MoE experts are not padded yet",
    "Qwen2MoeForCausalLM": "MoE experts are not padded yet",
    "Qwen3MoeForCausalLM": "MoE experts are not padded yet",
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
               "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Architectures that would take sliding-window layers from the config.
NO_SLIDING = ("MistralForCausalLM", "Phi3ForCausalLM", "GraniteForCausalLM",
              "Olmo2ForCausalLM")
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
    if moe:
        raise _refuse(arch, f"MoE experts are not padded yet ({moe[0]} is set)")
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


def _refuse(arch: str, why: str) -> UnsupportedArchitecture:
    return UnsupportedArchitecture(
        f"--enable-gyges cannot transform {arch}: {why}; drop --enable-gyges to serve it "
        f"(supported: {', '.join(SUPPORTED)})")
