"""Hook on SGLang's ``FusedMoE`` (the experts of Mixtral's and Qwen3-MoE's sparse blocks).

Under ``--enable-gyges`` :func:`convert_experts` (called by :mod:`gyges.hooks.model_runner`
once the weights are loaded) moves each ``FusedMoE``'s TP1 ``w13_weight``/``w2_weight`` into
a :class:`gyges.core.padded_moe.PaddedMoE` (per-expert padded shards), frees the dense
parameters and binds it as ``experts.gyges_mlp``. The forward hook then computes this rank's
partial from the router's top-k output (the gate stays replicated and runs SGLang's own
code); an expert module without it runs SGLang's forward.

Only the configuration SGLang's CPU path runs here is converted (unquantized, no AMX
prepacking, SiLU, no expert biases, TP1 without expert parallelism, the layer boundary
summing the FFN); anything else raises NotImplementedError naming the module.
"""
from __future__ import annotations

from typing import Any

import torch

from gyges.core.padded_moe import PaddedMoE

TARGET = "sglang.srt.layers.moe.fused_moe_triton.layer.FusedMoE"
ATTR = "gyges_mlp"  # as gyges.hooks.models.ATTR: the padded storage of a layer's FFN


def around_forward(original: Any, experts: Any, hidden_states: torch.Tensor,
                   topk_output: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    padded = experts.__dict__.get(ATTR)
    if padded is None:
        return original(experts, hidden_states, topk_output, *args, **kwargs)
    from sglang.srt.layers.moe.topk import TopKOutputChecker

    if not TopKOutputChecker.format_is_standard(topk_output):
        raise NotImplementedError(f"gyges: padded experts take the standard top-k output, "
                                  f"not {type(topk_output).__name__}")
    # The partial of this rank's shards; SGLang's layer boundary sums the k partials.
    return padded.forward(hidden_states, topk_output.topk_weights, topk_output.topk_ids)


def moe_class() -> type:
    from sglang.srt.layers.moe.fused_moe_triton.layer import FusedMoE

    return FusedMoE


def convert_experts(model: torch.nn.Module, max_degree: int, granule_bytes: int) -> int:
    """Give every ``FusedMoE`` of ``model`` padded expert shards; returns how many."""
    cls = moe_class()
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, cls) and ATTR not in module.__dict__:
            _check_convertible(name, module)
            padded = PaddedMoE.from_fused(module.w13_weight.detach(),
                                          module.w2_weight.detach(), max_degree,
                                          granule_bytes)
            for param in (module.w13_weight, module.w2_weight):
                # Zero elements: anything that still reads them fails loudly.
                param.data = param.data.new_empty(0)
            setattr(module, ATTR, padded)
            count += 1
    return count


def _check_convertible(name: str, moe: Any) -> None:
    from sglang.srt.layers.quantization.unquant import UnquantizedFusedMoEMethod

    config = moe.moe_runner_config
    problem = None
    if type(moe.quant_method) is not UnquantizedFusedMoEMethod:
        problem = f"is quantized ({type(moe.quant_method).__name__})"
    elif getattr(moe, "use_intel_amx_backend", False):
        problem = "holds AMX-prepacked weights"
    elif getattr(moe, "w13_weight_bias", None) is not None:
        problem = "has expert biases"
    elif config.activation != "silu" or config.gemm1_alpha is not None:
        problem = f"uses activation {config.activation!r} (only SiLU-gated experts are padded)"
    elif config.apply_router_weight_on_input:
        problem = "applies the router weight on the input"
    elif moe.moe_tp_size != 1 or moe.moe_ep_size != 1:
        problem = f"is already split (moe TP {moe.moe_tp_size}, EP {moe.moe_ep_size})"
    elif moe.reduce_results:
        problem = "sums its own output (reduce_results=True)"
    elif moe.w13_weight.dim() != 3 or moe.w13_weight.shape[0] != moe.num_experts:
        problem = f"holds {tuple(moe.w13_weight.shape)} w13 weights, not [E, 2I, Hd]"
    if problem:
        raise NotImplementedError(f"gyges: {name} {problem}; padded expert shards need the "
                                  "unquantized TP1 experts SGLang's CPU path runs")
