"""Hooks on the dense MLPs of SGLang's models (:data:`MLP_TARGETS`: Llama's, which Phi-3,
Mistral and InternLM3 use, Qwen2's, which ``qwen3.py`` imports as ``Qwen3MLP``, Granite's,
OLMo2's, GLM-4's, InternLM2's and Gemma 1/2/3's) and on OLMo2's QK-norm.

Under ``--enable-gyges`` :func:`convert_mlps` (called by :mod:`gyges.hooks.model_runner`
once the weights are loaded) moves each MLP's ``gate_up_proj``/``down_proj`` weights into
:class:`gyges.core.padded_mlp.PaddedMLPWeights` shards, frees the dense parameters and
binds a :class:`~gyges.core.padded_mlp.PaddedMLP` as ``mlp.gyges_mlp``. The forward hook
runs that instead of the two linears; an MLP without it runs SGLang's own forward. The
activation is read from the module (``SiluAndMul`` or ``GeluAndMul`` with its
``approximate``), so the shards compute what SGLang's forward computes.

Where the model's decoder layer does not sum the FFN partials itself (the MLP's down
projection was built with ``reduce_results=True``), the padded forward all-reduces its
partial over the down projection's group once a merge has made that group larger than 1.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from gyges.core.attention_shards import rank_major_heads
from gyges.core.padded_mlp import PaddedMLP, PaddedMLPWeights

MLP_TARGETS = (
    "sglang.srt.models.llama.LlamaMLP",
    "sglang.srt.models.qwen2.Qwen2MLP",
    "sglang.srt.models.granite.GraniteMLP",
    "sglang.srt.models.olmo2.Olmo2MLP",
    "sglang.srt.models.glm4.Glm4MLP",
    "sglang.srt.models.internlm2.InternLM2MLP",
    "sglang.srt.models.gemma.GemmaMLP",
    "sglang.srt.models.gemma2.Gemma2MLP",
    "sglang.srt.models.gemma3_causal.Gemma3MLP",
)
OLMO2_QK_NORM = "sglang.srt.models.olmo2.Olmo2Attention._apply_qk_norm"
ATTR = "gyges_mlp"
SAVED = "_gyges_tp1"  # gyges.switch.model.SAVED: a resharded module's TP1 attributes
logger = logging.getLogger(__name__)


def around_mlp_forward(original: Any, mlp: Any, x: torch.Tensor, *args: Any,
                       **kwargs: Any) -> torch.Tensor:
    padded = mlp.__dict__.get(ATTR)
    if padded is None:
        return original(mlp, x, *args, **kwargs)
    # The partial of this rank's shards. Models with layer boundaries (Llama, Qwen, GLM-4:
    # down_proj built with reduce_results=False) sum it at the FFN boundary when the TP size
    # is > 1; the others (Granite, OLMo2, InternLM2, Gemma) expect the MLP to return the sum.
    out = padded.forward(x)
    down = _down_proj(mlp)
    group = getattr(down, "tp_group", None)
    if padded.degree > 1 and getattr(down, "reduce_results", False) and group is not None:
        out = group.all_reduce(out)
    return out


def around_olmo2_qk_norm(original: Any, attn: Any, q: torch.Tensor,
                         k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """OLMo2 normalises the whole q (and k) projection, across all heads. Resharded, a rank
    holds only its heads (interleaved ownership, not SGLang's contiguous split), so it
    gathers every rank's heads, puts them back in model order, runs SGLang's own norms on
    the full vectors (the TP1 computation, bit for bit) and keeps its heads again."""
    qkv = attn.qkv_proj
    if SAVED not in vars(qkv) or qkv.tp_group is None or qkv.tp_group.world_size == 1:
        return original(attn, q, k)
    group = qkv.tp_group
    hq, hkv, d = attn.total_num_heads, attn.total_num_kv_heads, attn.head_dim
    q = _full_heads_op(q, group, hq, hkv, d, attn.q_norm.forward_native, kv=False)
    k = _full_heads_op(k, group, hq, hkv, d, attn.k_norm.forward_native, kv=True)
    return q, k


def _full_heads_op(x: torch.Tensor, group: Any, hq: int, hkv: int, d: int, op: Any,
                   kv: bool) -> torch.Tensor:
    """``op`` on the full head vector of ``x`` (this rank's owned heads), then this rank's
    heads of the result."""
    import torch.distributed as dist

    kdeg, r = group.world_size, group.rank_in_group
    parts = [torch.empty_like(x) for _ in range(kdeg)]
    dist.all_gather(parts, x.contiguous(), group=group.device_group)
    order = rank_major_heads(hq, hkv, kdeg, kv=kv)  # model head at each gathered position
    heads = len(order)
    inverse = torch.empty(heads, dtype=torch.int64)
    inverse[torch.tensor(order)] = torch.arange(heads)
    gathered = torch.cat(parts, dim=-1).view(-1, heads, d)
    full = gathered.index_select(1, inverse.to(x.device)).reshape(-1, heads * d)
    out = op(full).view(-1, heads, d)
    per_rank = heads // kdeg
    mine = inverse.new_tensor(order[r * per_rank:(r + 1) * per_rank]).to(x.device)
    return out.index_select(1, mine).reshape(*x.shape[:-1], per_rank * d)


def mlp_classes() -> tuple[type, ...]:
    import importlib

    classes = []
    for target in MLP_TARGETS:
        module, name = target.rsplit(".", 1)
        classes.append(getattr(importlib.import_module(module), name))
    return tuple(classes)


def _down_proj(mlp: Any) -> Any:
    return getattr(mlp, "down_proj", None) or mlp.w2


def _activation(name: str, mlp: Any) -> str:
    """The padded-shard activation equal to ``mlp.act_fn``'s, or NotImplementedError."""
    act = getattr(mlp, "act_fn", None)
    kind = type(act).__name__
    if kind == "SiluAndMul":
        return "silu"
    if kind == "GeluAndMul" and getattr(act, "approximate", None) in ("tanh", "none"):
        return f"gelu_{act.approximate}"
    raise NotImplementedError(f"gyges: {name}.act_fn is {kind}; padded MLP shards compute "
                              "SiLU or GELU gated MLPs only")


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

    linears = {"gate_up_proj": mlp.gate_up_proj, "down_proj": _down_proj(mlp)}
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
                                          _down_proj(mlp).weight.detach(),
                                          max_degree, granule_bytes,
                                          activation=_activation(name, mlp))
    for lin in linears.values():
        # Zero elements, not a shape-preserving stub: anything that still reads the dense
        # weight (a weight update, LoRA) fails loudly instead of computing garbage.
        lin.weight.data = lin.weight.data.new_empty(0)
    return weights
