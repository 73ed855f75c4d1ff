"""Hooks on the dense MLPs of SGLang's models: ``sglang.srt.models.llama.LlamaMLP`` and
``sglang.srt.models.qwen2.Qwen2MLP`` (which ``qwen3.py`` imports as ``Qwen3MLP``).

Under ``--enable-gyges`` :func:`convert_mlps` (called by :mod:`gyges.hooks.model_runner`
once the weights are loaded) moves each MLP's ``gate_up_proj``/``down_proj`` weights into
:class:`gyges.core.padded_mlp.PaddedMLPWeights` shards, frees the dense parameters and
binds a :class:`~gyges.core.padded_mlp.PaddedMLP` as ``mlp.gyges_mlp``. The forward hook
runs that instead of the two linears; an MLP without it runs SGLang's own forward.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from gyges.core.padded_mlp import PaddedMLP, PaddedMLPWeights

MLP_TARGETS = ("sglang.srt.models.llama.LlamaMLP", "sglang.srt.models.qwen2.Qwen2MLP")
ATTR = "gyges_mlp"
logger = logging.getLogger(__name__)


def around_mlp_forward(original: Any, mlp: Any, x: torch.Tensor, *args: Any,
                       **kwargs: Any) -> torch.Tensor:
    padded = mlp.__dict__.get(ATTR)
    if padded is None:
        return original(mlp, x, *args, **kwargs)
    # The partial of this rank's shards; the decoder layer's FFN boundary all-reduces it
    # when the TP size is > 1 (these models build down_proj with reduce_results=False).
    return padded.forward(x)


def mlp_classes() -> tuple[type, ...]:
    from sglang.srt.models.llama import LlamaMLP
    from sglang.srt.models.qwen2 import Qwen2MLP

    return (LlamaMLP, Qwen2MLP)


def convert_mlps(model: torch.nn.Module, max_degree: int, granule_bytes: int) -> int:
    """Give every supported MLP of ``model`` padded shards; returns how many were converted."""
    classes = mlp_classes()
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, classes) and ATTR not in module.__dict__:
            weights = _take_weights(name, module, max_degree, granule_bytes)
            setattr(module, ATTR, PaddedMLP(weights))
            count += 1
    return count


def _take_weights(name: str, mlp: Any, max_degree: int, granule_bytes: int) -> PaddedMLPWeights:
    """Copy the dense weights into shards, then free the dense parameters' storage."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    linears = {"gate_up_proj": mlp.gate_up_proj, "down_proj": mlp.down_proj}
    for lin_name, lin in linears.items():
        problem = None
        if not isinstance(lin.quant_method, UnquantizedLinearMethod):
            problem = f"is quantized ({type(lin.quant_method).__name__})"
        elif getattr(lin, "use_intel_amx_backend", False):
            problem = "holds AMX-prepacked weights"
        elif getattr(lin, "bias", None) is not None:
            problem = "has a bias"
        elif getattr(lin, "tp_size", 1) != 1:
            problem = f"is already split for TP {lin.tp_size}"
        if problem:
            raise NotImplementedError(
                f"gyges: {name}.{lin_name} {problem}; padded MLP shards need the dense, "
                "unquantized TP1 weights"
            )
    weights = PaddedMLPWeights.from_fused(mlp.gate_up_proj.weight.detach(),
                                          mlp.down_proj.weight.detach(),
                                          max_degree, granule_bytes)
    for lin in linears.values():
        # Zero elements, not a shape-preserving stub: anything that still reads the dense
        # weight (a weight update, LoRA) fails loudly instead of computing garbage.
        lin.weight.data = lin.weight.data.new_empty(0)
    return weights
