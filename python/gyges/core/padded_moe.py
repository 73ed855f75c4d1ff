"""A mixture-of-experts layer's experts in padded shards, bound to this rank's TP degree.

The experts' weights live in one :class:`~gyges.core.padded_mlp.PaddedMLPWeights` with an
experts dimension: shard s holds intermediate columns ``[s*R, (s+1)*R)`` of every expert
(the split SGLang's MoE TP makes: each expert's intermediate dimension is cut, the router
stays replicated). At degree k local rank r owns the shards with ``s % k == r``, so a merge
releases the others (memory of every expert at once) and a split restores them, with the
same ownership, residency and transfer code as a dense MLP.

The forward computes what SGLang's ``moe_forward_native`` computes, restricted to the owned
columns: tokens grouped by routed expert, per expert ``act(x gate^T) * (x up^T)`` then the
down projection, then the top-k outputs of each token weighted by the router and summed.
It returns this rank's partial; at degree k > 1 the k partials sum (all-reduce) to the full
MoE output, the sum SGLang's layer boundary does for a row-parallel FFN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gyges.core.padded_mlp import ACTIVATIONS, PaddedMLP, PaddedMLPWeights


class PaddedMoE(PaddedMLP):
    """One MoE layer's expert shards at (degree, local_rank); boots at TP1. Binding
    (``set_degree``) as :class:`~gyges.core.padded_mlp.PaddedMLP`; the forward takes the
    router's top-k output as well."""

    @classmethod
    def from_fused(cls, w13: torch.Tensor, w2: torch.Tensor, max_degree: int,
                   granule_bytes: int, activation: str = "silu") -> PaddedMoE:
        """From SGLang's TP1 ``FusedMoE`` weights: ``w13`` `[E, 2I, Hd]` (gate rows, then up
        rows) and ``w2`` `[E, Hd, I]`."""
        if w13.dim() != 3 or w13.shape[1] % 2 or w2.dim() != 3:
            raise ValueError(f"w13 {tuple(w13.shape)} must be [E, 2I, Hd] and w2 "
                             f"{tuple(w2.shape)} [E, Hd, I]")
        gate, up = w13.chunk(2, dim=1)
        return cls(PaddedMLPWeights(gate, up, w2, max_degree, granule_bytes,
                                    activation=activation))

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor,  # type: ignore[override]
                topk_ids: torch.Tensor) -> torch.Tensor:
        """This rank's partial MoE output for ``x`` `[T, Hd]` routed to ``topk_ids``
        `[T, K]` with ``topk_weights`` `[T, K]`; the sum over ranks is the MoE output."""
        w = self.weights
        shards = w.owned_shards(self.degree, self.local_rank)
        views = [(w.gate_up(s), w.down_t(s)) for s in shards]
        rows = w.shard_rows
        act = ACTIVATIONS[w.activation]
        top_k = topk_ids.shape[1]
        # Group the (token, slot) pairs by expert, as moe_forward_native does.
        idxs = topk_ids.reshape(-1).argsort()
        counts = torch.bincount(topk_ids.reshape(-1).to(torch.int64),
                                minlength=w.experts).tolist()
        sorted_tokens = x[idxs // top_k]
        outputs = []
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            tokens = sorted_tokens[start:start + n]
            out: torch.Tensor | None = None
            for gate_up, down_t in views:
                g = F.linear(tokens, gate_up[expert])
                part = torch.mm(act(g[:, :rows]) * g[:, rows:], down_t[expert])
                out = part if out is None else out.add_(part)
            assert out is not None  # every rank owns at least one shard
            outputs.append(out)
            start += n
        if not outputs:
            return x.new_zeros(x.shape)
        outs = torch.cat(outputs, dim=0)
        per_slot = torch.empty_like(outs)
        per_slot[idxs] = outs
        return (per_slot.view(*topk_ids.shape, -1).type(topk_weights.dtype)
                .mul_(topk_weights.unsqueeze(-1)).sum(dim=1).type(x.dtype))
