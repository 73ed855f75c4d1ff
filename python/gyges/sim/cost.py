"""Step-time roofline, memory plan per degree and transformation cost.

Step time of one instance of degree k (every term per GPU; k GPUs work in parallel)::

    t = c_step + L * c_layer                                   fixed host/kernel overheads
      + max(GEMM FLOPs / (k * F * mfu),  weight bytes / (k * B * mbu))     linear layers
      + max(attn FLOPs / (k * F * mfu_attn), KV bytes / (k * B * mbu))     attention
      + [k > 1] 2 L * (lat + 2 (k-1)/k * N * hidden * 2 / NVLink)          all-reduces

F, B, NVLink: the GPU's peaks (:mod:`gyges.sim.gpus`); N: tokens in the step. Prefill is
chunked (``chunk_tokens`` per step, decode paused meanwhile, SGLang's default). The
efficiencies and overheads live in :class:`CostParams`; ``calibrate`` fits them to a live
server. Memory plans and transformation costs are below; docs/simulator.md has the sources.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from gyges.core.shard_geometry import DEFAULT_GRANULE_BYTES, ShardGeometry
from gyges.core.transfer_plan import plan_transformation
from gyges.sim.gpus import GpuSpec
from gyges.sim.models import ModelSpec, SimInputError

ALLREDUCE_SCALINGS = ("flat", "ring")


@dataclass(frozen=True)
class CostParams:
    """Hardware peaks plus the fitted efficiencies and fixed costs (seconds, bytes)."""

    name: str
    flops: float
    hbm_bw: float
    memory: float
    nvlink_bw: float
    mfu: float = 0.65  # achieved fraction of peak FLOPs in large GEMMs
    mfu_attn: float = 0.45  # flash attention reaches less of peak than GEMMs
    mbu: float = 0.80  # achieved fraction of HBM bandwidth when memory-bound
    step_overhead_s: float = 0.004  # scheduler + sampling + launch per step
    # per request, outside the steps: HTTP, tokenizer, dispatch, detokenizer (adds to its
    # TTFT and latency, not to the instance's busy time); 0 for the GPU presets (unmeasured)
    request_overhead_s: float = 0.0
    # steps between a prefill's end and its first token leaving the scheduler: SGLang's
    # overlap scheduler processes a batch's result after launching the next step, and on a
    # CPU the launch runs the whole step (1); on a GPU it returns at once (0)
    first_token_lag_steps: float = 0.0
    layer_overhead_s: float = 15e-6  # per layer per step (kernel launches, norms, rope)
    allreduce_latency_s: float = 12e-6  # floor of one NVLink all-reduce
    # how that floor grows with the degree k: "flat" (the GPU presets: NCCL's small-message
    # all-reduce within one NVLink/NVSwitch host, 2-8 GPUs, taken as one floor) or "ring"
    # (x (k - 1): a ring's hops one after another, as gloo's all-reduce on the CPU test
    # server; calibrate keeps whichever fits the measured degrees better)
    allreduce_scaling: str = "flat"
    mem_fraction: float = 0.88  # SGLang mem_fraction_static: weights + KV share
    chunk_tokens: int = 8192  # chunked prefill budget per step
    transform_fixed_s: float = 0.4  # pause, state exchange, rebuild (per pairwise step)
    overlap: float = 0.0  # fraction of a transformation's transfer hidden under serving
    # KV slots of one TP1 replica fixed by the server's configuration (--max-total-tokens,
    # as on the CPU test servers) instead of derived from memory: every plan then holds
    # k x this at degree k (what the live server reports today).
    kv_tokens_tp1: int | None = None
    # cores a CPU host's scheduler processes share (a calibration of a CPU server; 0 on
    # GPUs: not modelled). Steps slow down while more processes are busy than that
    # (sim/cpu.py).
    host_cores: float = 0.0

    @classmethod
    def for_gpu(cls, gpu: GpuSpec) -> CostParams:
        return cls(gpu.name, gpu.bf16_flops, gpu.hbm_bw, gpu.memory, gpu.nvlink_bw)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CostParams:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise SimInputError(f"calibration has unknown keys {sorted(unknown)}")
        try:
            params = cls(**data)
        except TypeError as e:
            raise SimInputError(f"calibration is incomplete: {e}") from None
        if params.allreduce_scaling not in ALLREDUCE_SCALINGS:
            raise SimInputError(f"calibration: allreduce_scaling must be one of "
                                f"{list(ALLREDUCE_SCALINGS)}, got {params.allreduce_scaling!r}")
        return params

    def with_(self, **kw: Any) -> CostParams:
        return replace(self, **kw)


class StepCost:
    """Step times of one model on one kind of GPU (pure functions of the shapes)."""

    def __init__(self, model: ModelSpec, params: CostParams) -> None:
        self.m, self.p = model, params
        m = model
        self._linear_params = m.layers * (m.attn_params_per_layer + m.mlp_params_per_layer)
        self._lm_head = m.vocab * m.hidden
        self._attn_flops_per_pair = 4 * m.layers * m.heads * m.head_dim  # QK^T and PV

    def _overhead(self) -> float:
        return self.p.step_overhead_s + self.m.layers * self.p.layer_overhead_s

    def latency(self, k: int) -> float:
        """Latency floor of one collective over ``k`` GPUs (0 for one)."""
        if k <= 1:
            return 0.0
        hops = k - 1 if self.p.allreduce_scaling == "ring" else 1
        return self.p.allreduce_latency_s * hops

    def _allreduce(self, k: int, tokens: int) -> float:
        if k <= 1:
            return 0.0
        msg = tokens * self.m.hidden * self.m.dtype_bytes
        one = self.latency(k) + 2 * (k - 1) / k * msg / self.p.nvlink_bw
        return 2 * self.m.layers * one

    def _linear(self, k: int, tokens: int, seqs: int) -> float:
        p = self.p
        flops = 2 * tokens * self._linear_params + 2 * seqs * self._lm_head
        wbytes = (self._linear_params + self._lm_head) * self.m.dtype_bytes
        return max(flops / (k * p.flops * p.mfu), wbytes / (k * p.hbm_bw * p.mbu))

    def decode(self, k: int, batch: int, ctx_tokens: int) -> float:
        """One decode step of ``batch`` requests holding ``ctx_tokens`` KV in total."""
        if batch <= 0:
            return 0.0
        p = self.p
        attn = max(self._attn_flops_per_pair * ctx_tokens / (k * p.flops * p.mfu_attn),
                   self.m.kv_bytes_per_token * ctx_tokens / (k * p.hbm_bw * p.mbu))
        return self._overhead() + self._linear(k, batch, batch) + attn + self._allreduce(k, batch)

    def prefill(self, k: int, tokens: int, pairs: float, seqs: int) -> float:
        """Prefill of ``tokens`` new tokens of ``seqs`` requests in chunks; ``pairs`` is the
        number of (query, key) pairs attention computes (p^2/2 for a fresh prompt p)."""
        if tokens <= 0:
            return 0.0
        p = self.p
        chunks = max(1, math.ceil(tokens / p.chunk_tokens))
        per_chunk = min(tokens, p.chunk_tokens)
        linear = chunks * self._linear(k, per_chunk, max(1, seqs // chunks))
        attn = self._attn_flops_per_pair * pairs / (k * p.flops * p.mfu_attn)
        kv_write = self.m.kv_bytes_per_token * tokens / (k * p.hbm_bw * p.mbu)
        return (chunks * (self._overhead() + self._allreduce(k, per_chunk))
                + linear + attn + kv_write)

    def sp_prefill(self, g: int, tokens: int, pairs: float, seqs: int) -> float:
        """Sequence parallel over ``g`` GPUs with full weights on each (Shift Parallelism's
        SP mode, LoongServe's ESP): each GPU takes 1/g of the tokens; 4 all-to-alls per
        layer of 1/g of the activations each."""
        if tokens <= 0:
            return 0.0
        share = math.ceil(tokens / g)
        t = self.prefill(1, share, pairs / g, max(1, seqs // g))
        a2a = tokens * self.m.hidden * self.m.dtype_bytes / g * (g - 1) / g
        chunks = max(1, math.ceil(share / self.p.chunk_tokens))
        return t + 4 * self.m.layers * (chunks * self.latency(g)
                                        + a2a / self.p.nvlink_bw)


@dataclass(frozen=True)
class MemoryPlan:
    """KV capacity (tokens) of one instance of degree k under each way of holding weights.

    ``base`` is the degree of one scheduler rank (1 unless a TP1 replica cannot hold the
    model). Gyges pads the MLP into ``max_degree`` shards (``core.shard_geometry``) and a
    merged group releases the shards it no longer owns; attention and embeddings stay as
    at the base degree. ``flying`` keeps full weights resident at every degree.
    """

    model: ModelSpec
    params: CostParams
    max_degree: int
    granule_bytes: int = DEFAULT_GRANULE_BYTES

    @property
    def usable(self) -> float:
        return self.params.memory * self.params.mem_fraction

    @property
    def padded_mlp_bytes(self) -> int:
        m = self.model
        geo = ShardGeometry.for_mlp(m.hidden, m.intermediate, self.max_degree, m.dtype_bytes,
                                    self.granule_bytes)
        return geo.padded_nbytes * self.max_degree * m.layers

    def _tokens(self, k: int, weights_per_gpu: float) -> int:
        if self.params.kv_tokens_tp1 is not None:
            return k * self.params.kv_tokens_tp1
        free = self.usable - weights_per_gpu
        return max(0, int(k * free // self.model.kv_bytes_per_token))

    def static(self, k: int) -> int:
        """Stock SGLang TP-k: every weight sharded k ways."""
        return self._tokens(k, self.model.weight_bytes / k)

    def gyges(self, k: int, base: int = 1) -> int:
        """Gyges at degree k (>= base): non-MLP weights at the base sharding, padded MLP 1/k."""
        other = self.model.weight_bytes - self.model.mlp_bytes
        return self._tokens(k, other / base + self.padded_mlp_bytes / k)

    def flying(self, k: int, base: int = 1) -> int:
        """Flying Serving: full (base-degree) weights stay resident, KV = k x one replica."""
        return k // base * self._tokens(base, self.model.weight_bytes / base)

    def shift(self, g: int) -> int:
        """Shift Parallelism: TP shards for TP mode plus a full replica for SP mode."""
        w = self.model.weight_bytes
        return self._tokens(g, w + w / g)

    def base_degree(self, kind: str, limit: int) -> int | None:
        """Smallest power-of-two degree <= limit at which one instance holds any KV."""
        k = 1
        while k <= limit:
            cap = self.gyges(k, k) if kind == "gyges" else (
                self.flying(k, k) if kind == "flying" else self.static(k))
            if cap > 0:
                return k
            k *= 2
        return None


class TransformCost:
    """Time a pairwise merge (k -> 2k) or split (2k -> k) of scheduler ranks takes.

    KV bytes come from ``core.transfer_plan.plan_transformation`` on the group's used
    slots (the same plan the live server executes); a merge moves 0 weight bytes, a split
    restores the MLP shards each GPU gains back (1/(2k) of the padded MLP per pairwise
    step, so TPk -> TP1 restores (k-1)/k). Every GPU sends over its own NVLink in
    parallel, so the time is the busiest GPU's bytes over NVLink plus the fixed cost.
    ``paused_s`` is the part the group does not serve: all of it stop-the-world, or the
    fixed cost plus (1 - overlap) of the transfer with pre-copy.
    """

    def __init__(self, model: ModelSpec, params: CostParams, plan: MemoryPlan,
                 base: int = 1) -> None:
        self.m, self.p, self.plan, self.base = model, params, plan, base
        heads = model.kv_heads // base if model.kv_heads % base == 0 else model.kv_heads
        self.heads = max(1, heads)

    def kv_bytes_per_gpu(self, ranks: int, k_from: int, k_to: int,
                         used_per_segment: list[int]) -> int:
        plan = plan_transformation(range(ranks), k_from, k_to, self.heads,
                                   {i: [(0, u)] for i, u in enumerate(used_per_segment) if u})
        busiest = max((sum(mv.num_slots for mv in plan.sends(r)) for r in range(ranks)),
                      default=0)
        return busiest * self.m.head_dim * self.m.dtype_bytes * 2 * self.m.layers

    def duration(self, op: str, k_from: int, k_to: int, used_per_segment: list[int],
                 weights_move: bool = True) -> tuple[float, float, int]:
        """(total seconds, paused seconds, bytes moved by the busiest GPU)."""
        ranks = max(k_from, k_to)
        kv = self.kv_bytes_per_gpu(ranks, k_from, k_to, used_per_segment)
        mlp = 0
        if op == "split" and weights_move:
            mlp = int(self.plan.padded_mlp_bytes / (ranks * self.base))
        nbytes = kv + mlp
        transfer = nbytes / self.p.nvlink_bw
        total = self.p.transform_fixed_s + transfer
        paused = self.p.transform_fixed_s + (1.0 - self.p.overlap) * transfer
        return total, paused, nbytes
