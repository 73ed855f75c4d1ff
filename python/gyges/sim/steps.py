"""Step models binding :class:`~gyges.sim.cost.StepCost` to one instance's shape."""

from __future__ import annotations

import math

from gyges.sim.cost import StepCost


class TPStep:
    """Tensor parallel over ``k`` GPUs (static TP, Gyges and Flying merged groups)."""

    def __init__(self, cost: StepCost, k: int) -> None:
        self.cost, self.k = cost, k

    def decode(self, batch: int, ctx_tokens: int) -> float:
        return self.cost.decode(self.k, batch, ctx_tokens)

    def prefill(self, tokens: int, pairs: float, seqs: int) -> float:
        return self.cost.prefill(self.k, tokens, pairs, seqs)


class ShiftStep:
    """Shift Parallelism: TP over ``g`` GPUs when a step schedules at most ``threshold``
    tokens, else sequence parallel (full weights on each GPU, 1/g of the tokens each)."""

    def __init__(self, cost: StepCost, g: int, threshold: int) -> None:
        self.cost, self.g, self.threshold = cost, g, threshold

    def decode(self, batch: int, ctx_tokens: int) -> float:
        if batch <= self.threshold:
            return self.cost.decode(self.g, batch, ctx_tokens)
        per = math.ceil(batch / self.g)
        return self.cost.decode(1, per, ctx_tokens // self.g) + self._a2a(batch)

    def prefill(self, tokens: int, pairs: float, seqs: int) -> float:
        if tokens <= self.threshold:
            return self.cost.prefill(self.g, tokens, pairs, seqs)
        return self.cost.sp_prefill(self.g, tokens, pairs, seqs)

    def _a2a(self, tokens: int) -> float:
        m, p = self.cost.m, self.cost.p
        nbytes = tokens * m.hidden * m.dtype_bytes / self.g * (self.g - 1) / self.g
        return 4 * m.layers * (self.cost.latency(self.g) + nbytes / p.nvlink_bw)


class ESPStep:
    """LoongServe's elastic sequence parallelism over ``d`` TP1 instances: prefill split
    over the d instances; decode of the group's batch on full-weight instances with the KV
    (and the attention over it) spread over d, plus one synchronisation per layer."""

    def __init__(self, cost: StepCost, d: int, base: int = 1) -> None:
        self.cost, self.d, self.base = cost, d, base  # base: TP degree of one instance

    def decode(self, batch: int, ctx_tokens: int) -> float:
        sync = self.cost.m.layers * self.cost.latency(self.d)
        return self.cost.decode(self.base, batch, ctx_tokens // self.d) + sync

    def prefill(self, tokens: int, pairs: float, seqs: int) -> float:
        if self.d == 1:
            return self.cost.prefill(self.base, tokens, pairs, seqs)
        return self.cost.sp_prefill(self.d, tokens, pairs, seqs)
