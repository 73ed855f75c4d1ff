"""Switch a TP1-loaded decoder (Llama family, Qwen2/3, Granite, OLMo2, GLM-4, Gemma,
InternLM2 names; Mixtral and Qwen3-MoE experts) to TP-k in place, and back.

``reshard_model`` keeps, on local rank r of a degree-k instance, the attention heads it owns
(interleaved ownership, :mod:`gyges.core.attention_shards`) and the MLP columns of its shards
(:mod:`gyges.core.dense_shards`); the TP1 tensors are kept aside and ``restore_tp1`` puts
them back (bit-exact split, no communication; the cost is holding both while merged).
Embedding, LM head and logits stay replicated (built at TP1, they never reduce).

SGLang builds o_proj with ``reduce_results=False`` and plans the attention sum away at TP1,
so the resharded o_proj must all-reduce itself; the FFN sum is issued at call time over
``get_parallel().tp_group`` once the parallel state says ``tp_size=k`` (models with layer
boundaries), or by the MLP's own down projection (``reduce_results=True``: Granite, OLMo2,
InternLM2, Gemma), which a padded MLP forward then does itself (gyges.hooks.models).

Module names differ by model family (:data:`ATTN_NAMES`, :data:`MLP_NAMES`,
:data:`MOE_NAMES`); :func:`parts` finds them. A mixture of experts lives only in padded
per-expert shards (gyges.hooks.fused_moe): its router stays replicated, and its partial is
summed by SGLang's layer boundary like a row-parallel FFN. OLMo2's QK-norm over the whole
q/k projection needs the full heads: its norm runs through
gyges.hooks.models.around_olmo2_qk_norm while resharded.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.nn import Parameter

from gyges.core.attention_shards import slice_o_proj, slice_qkv
from gyges.core.dense_shards import owned_mlp_columns

SAVED = "_gyges_tp1"  # attribute on each touched module: its TP1 attributes
_ATTRS = ("weight", "bias", "tp_group", "num_heads", "num_kv_heads", "q_size", "kv_size",
          "output_size_per_partition", "output_partition_sizes", "input_size_per_partition",
          "reduce_results", "tp_q_head_num", "tp_k_head_num", "tp_v_head_num")
PADDED_MLP = "gyges_mlp"  # gyges.hooks.models.ATTR: a layer whose MLP lives in shards


# (attention attribute of a layer, its fused QKV, its output projection)
ATTN_NAMES = (("self_attn", "qkv_proj", "o_proj"), ("attention", "wqkv", "wo"))
# (MLP attribute of a layer, its fused gate/up projection, its down projection)
MLP_NAMES = (("mlp", "gate_up_proj", "down_proj"), ("feed_forward", "gate_up_proj", "w2"))
# (MoE block attribute of a layer, its experts): Qwen3-MoE's, Mixtral's
MOE_NAMES = (("mlp", "experts"), ("block_sparse_moe", "experts"))


def _layers(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise NotImplementedError(f"gyges: cannot reshard {type(model).__name__}: no "
                                  "model.layers (dense decoders only)")
    return list(layers)


def parts(layer: Any) -> tuple[Any, Any, Any, Any, Any, Any]:
    """``(attention, mlp, qkv, o_proj, gate_up, down)`` of a decoder layer; for a mixture of
    experts ``mlp`` is the experts module and ``gate_up``/``down`` are None. Raises
    NotImplementedError naming what is missing."""
    found = []
    for names, what in ((ATTN_NAMES, "attention with a fused QKV and an output projection"),
                        (MLP_NAMES, "dense gated MLP")):
        for outer, first, second in names:
            mod = getattr(layer, outer, None)
            if mod is not None and hasattr(mod, first) and hasattr(mod, second):
                found.append((mod, getattr(mod, first), getattr(mod, second)))
                break
        else:
            experts = _experts(layer)
            if what.startswith("dense") and experts is not None:
                found.append((experts, None, None))
                continue
            raise NotImplementedError(f"gyges: {type(layer).__name__} has no {what}; only "
                                      "dense gated MLPs and padded experts can be resharded")
    (a, qkv, o), (m, gu, dn) = found
    return a, m, qkv, o, gu, dn


def _experts(layer: Any) -> Any:
    for outer, inner in MOE_NAMES:
        experts = getattr(getattr(layer, outer, None), inner, None)
        if experts is not None:
            return experts
    return None


def check_reshardable(model: Any, k: int, num_shards: int, *,
                      already: bool = False) -> None:
    """Raise before anything changes if ``model`` cannot be resharded to degree ``k``
    (``already``: it is resharded now and will be restored to TP1 first)."""
    for layer in _layers(model):
        a, m, qkv, o, gu, _ = parts(layer)
        if getattr(o, "bias", None) is not None:
            raise NotImplementedError("gyges: o_proj with a bias is not supported yet")
        if a.total_num_kv_heads % k:
            raise ValueError(f"degree {k} does not divide {a.total_num_kv_heads} KV heads")
        if gu is None and PADDED_MLP not in m.__dict__:
            raise NotImplementedError("gyges: MoE experts must be in padded shards")
        inter = gu.weight.shape[0] // 2 if gu is not None else 0
        if PADDED_MLP not in m.__dict__ and inter % num_shards:
            raise ValueError(f"MLP intermediate {inter} not divisible into {num_shards} shards")
        if SAVED in vars(qkv) and not already:
            raise RuntimeError("gyges: model is already resharded")


def _save(mod: Any) -> None:
    vars(mod)[SAVED] = {n: getattr(mod, n) for n in _ATTRS if hasattr(mod, n)}


def _param(t: torch.Tensor) -> Parameter:
    return Parameter(t.contiguous(), requires_grad=False)


def reshard_model(model: Any, k: int, r: int, group: Any, num_shards: int) -> int:
    """Make ``model`` local rank ``r`` of a TP-``k`` instance over ``group``.

    ``num_shards`` is the MLP shard count G (the host's max TP). Returns the bytes of the
    new (sliced) tensors."""
    check_reshardable(model, k, num_shards)
    new_bytes = 0
    for layer in _layers(model):
        a, m, qkv, o, gu, dn = parts(layer)
        for mod in (qkv, o, gu, dn, a, a.attn):
            if mod is not None:
                _save(mod)
        hq_all, hkv_all, d = a.total_num_heads, a.total_num_kv_heads, a.head_dim
        hq, hkv = hq_all // k, hkv_all // k
        heads = (hq_all, hkv_all, d, k, r)
        qkv.weight = _param(slice_qkv(qkv.weight.data, *heads))
        if qkv.bias is not None:
            qkv.bias = _param(slice_qkv(qkv.bias.data, *heads))
        qkv.num_heads, qkv.num_kv_heads = hq, hkv
        qkv.output_size_per_partition = (hq + 2 * hkv) * d
        qkv.output_partition_sizes = [hq * d, hkv * d, hkv * d]
        qkv.tp_group = group
        a.num_heads, a.num_kv_heads, a.q_size, a.kv_size = hq, hkv, hq * d, hkv * d
        a.attn.tp_q_head_num, a.attn.tp_k_head_num, a.attn.tp_v_head_num = hq, hkv, hkv
        o.weight = _param(slice_o_proj(o.weight.data, *heads))
        o.input_size_per_partition = hq * d
        o.tp_group = group
        o.reduce_results = True  # the TP1-built attention boundary owes no sum
        padded = m.__dict__.get(PADDED_MLP)
        if padded is not None:
            # Padded shards: bind the owned ones (s % k == r); the member then releases the
            # others (gyges.comm.weight_transfer) and restores them on split.
            padded.set_degree(k, r)
            if dn is not None:
                dn.tp_group = group  # where a padded MLP that owes its own sum reduces
            new_bytes += sum(t.numel() * t.element_size() for t in (qkv.weight, o.weight))
            continue
        inter = gu.weight.shape[0] // 2
        cols = owned_mlp_columns(inter, num_shards, k, r)
        gate, up = gu.weight.data.split([inter, inter], 0)
        gu.weight = _param(torch.cat([gate.index_select(0, cols), up.index_select(0, cols)]))
        gu.output_size_per_partition = 2 * len(cols)
        gu.output_partition_sizes = [len(cols), len(cols)]
        gu.tp_group = group
        dn.weight = _param(dn.weight.data.index_select(1, cols))
        dn.input_size_per_partition = len(cols)
        dn.tp_group = group  # the FFN boundary sums over get_parallel().tp_group
        new_bytes += sum(t.numel() * t.element_size() for t in
                         (qkv.weight, o.weight, gu.weight, dn.weight))
    return new_bytes


def restore_tp1(model: Any) -> None:
    """Undo :func:`reshard_model` exactly (the saved TP1 tensors and attributes)."""
    for layer in _layers(model):
        a, m, qkv, o, gu, dn = parts(layer)
        padded = m.__dict__.get(PADDED_MLP)
        if padded is not None and not padded.weights.missing_shards(1, 0):
            padded.set_degree(1, 0)  # else the caller binds it once shards are back
        for mod in (qkv, o, gu, dn, a, a.attn):
            saved = vars(mod).pop(SAVED, None) if mod is not None else None
            if saved is None:
                continue
            for name, value in saved.items():
                setattr(mod, name, value)


def padded_weights(model: Any) -> list[Any]:
    """The padded MLP (or expert) shard stores of every layer (empty if the MLPs are
    dense)."""
    out = []
    for layer in _layers(model):
        padded = parts(layer)[1].__dict__.get(PADDED_MLP)
        if padded is not None:
            out.append(padded.weights)
    return out
