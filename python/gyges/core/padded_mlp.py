"""Padded, sharded storage of one dense MLP (gate/up/down) so that a merge frees memory
without copying and a split restores it with one gather.

The intermediate dimension I is cut into G (max degree) column shards of I/G. Shard s is one
separately allocated flat buffer, padded to the allocation granule::

    shard s (flat, elements)              rows of width Hd
    [0            , R*Hd)                 gate[s*R:(s+1)*R]     \\ gate_up(s): [2R, Hd]
    [R*Hd         , 2R*Hd)                up[s*R:(s+1)*R]       /
    [2R*Hd        , 3R*Hd)                down[:, s*R:(s+1)*R]^T  down_t(s): [R, Hd]
    [3R*Hd        , padded)               zeros (padding up to a multiple of the granule)

with R = I/G. A mixture of experts (:class:`gyges.core.padded_moe.PaddedMoE`) keeps E such
blocks of ``[3R, Hd]`` in each shard buffer, one per expert, so shard s of an MoE layer holds
columns ``[s*R, (s+1)*R)`` of every expert's intermediate dimension (SGLang's MoE TP split)
and releasing it frees that slice of every expert at once.

At degree k local rank r owns the shards s with s % k == r (interleaved, so ownership nests
like the KV heads), and its partial MLP output is
`sum over owned s of (act(x gate_s^T) * (x up_s^T)) down_t(s)`; the k partials all-reduce
to the dense MLP. ``act`` is SiLU (Llama, Qwen, ...) or GELU, exact or tanh-approximated
(Gemma), as :data:`ACTIVATIONS` names them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from gyges.core.kv_layout import check_local_rank, is_power_of_two
from gyges.core.shard_allocator import ShardAllocator, default_allocator
from gyges.core.shard_geometry import DEFAULT_GRANULE_BYTES, ShardGeometry

__all__ = ["ACTIVATIONS", "DEFAULT_GRANULE_BYTES", "PaddedMLP", "PaddedMLPWeights",
           "ShardGeometry"]

AllocatorFactory = Callable[[ShardGeometry, torch.dtype, torch.device], ShardAllocator]

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_none": lambda x: F.gelu(x, approximate="none"),
}


class PaddedMLPWeights:
    """One layer's MLP in G padded shards; shards can be released and restored at runtime.

    Accounting: `padded_bytes`/`unpadded_bytes` describe all G shards (a full copy);
    `resident_bytes` is what is allocated now and drops by exactly `release`'s return value.
    """

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        max_degree: int,
        granule_bytes: int = DEFAULT_GRANULE_BYTES,
        activation: str = "silu",
        allocator: AllocatorFactory = default_allocator,
    ) -> None:
        """gate, up: `[I, Hd]`; down: `[Hd, I]` (torch Linear weight layout), or with a
        leading experts dimension (`[E, I, Hd]`, `[E, Hd, I]`: an MoE layer's experts);
        ``activation`` a key of :data:`ACTIVATIONS`, applied to the gate; ``allocator``
        builds this weight's :class:`~gyges.core.shard_allocator.ShardAllocator` from its
        geometry, dtype and device."""
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        if gate.dim() not in (2, 3) or gate.shape != up.shape or down.dim() != gate.dim():
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must be "
                             f"[I, Hd] (or [E, I, Hd] with down [E, Hd, I])")
        if gate.dim() == 2:
            gate, up, down = gate.unsqueeze(0), up.unsqueeze(0), down.unsqueeze(0)
        experts, inter, hidden = gate.shape
        if tuple(down.shape) != (experts, hidden, inter):
            want = (hidden, inter) if experts == 1 else (experts, hidden, inter)
            raise ValueError(f"down must be {want}, got {tuple(down.shape)}")
        if not gate.dtype == up.dtype == down.dtype:
            raise ValueError("gate, up and down must share a dtype")
        self.hidden = hidden
        self.intermediate = inter
        self.experts = experts  # 1 for a dense MLP
        self.max_degree = max_degree
        self.dtype = gate.dtype
        self.device = gate.device
        # One [3R, Hd] block per expert in each buffer (layers_per_buffer counts blocks).
        self.geometry = ShardGeometry.for_mlp(
            hidden, inter, max_degree, gate.element_size(), granule_bytes,
            layers_per_buffer=experts,
        )
        self.allocator = allocator(self.geometry, self.dtype, self.device)
        rows = self.geometry.rows
        self._buffers: list[torch.Tensor | None] = [None] * max_degree
        # (gate_up, down_t) views of each resident buffer, made once: the forward runs per
        # layer per step and should not rebuild them. Dropped together with the buffer.
        self._views: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * max_degree
        for s in range(max_degree):
            cols = slice(s * rows, (s + 1) * rows)
            buf = self.allocator.allocate(s)
            blocks = self._blocks_of(buf)
            blocks[:, :rows].copy_(gate[:, cols])
            blocks[:, rows:2 * rows].copy_(up[:, cols])
            blocks[:, 2 * rows:].copy_(down[:, :, cols].transpose(1, 2))
            self._install(s, buf)

    @classmethod
    def from_fused(
        cls,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        max_degree: int,
        granule_bytes: int = DEFAULT_GRANULE_BYTES,
        activation: str = "silu",
    ) -> PaddedMLPWeights:
        """From a fused `[2I, Hd]` gate_up weight (gate rows first, then up rows, as SGLang's
        MergedColumnParallelLinear stores them at TP1) and down `[Hd, I]`."""
        if gate_up.dim() != 2 or gate_up.shape[0] % 2 != 0:
            raise ValueError(f"gate_up must be [2I, Hd], got {tuple(gate_up.shape)}")
        gate, up = gate_up.chunk(2, dim=0)
        return cls(gate, up, down, max_degree, granule_bytes, activation)

    # -- sizes -------------------------------------------------------------------------------

    @property
    def granule_bytes(self) -> int:
        return self.geometry.granule_bytes

    @property
    def shard_rows(self) -> int:
        """R = I / G intermediate columns per shard."""
        return self.geometry.rows

    @property
    def padded_bytes(self) -> int:
        """Bytes of all G padded shards (a full copy)."""
        return self.geometry.padded_nbytes * self.max_degree

    @property
    def unpadded_bytes(self) -> int:
        """Bytes of the dense gate, up and down weights."""
        return self.geometry.nbytes * self.max_degree

    @property
    def padding_overhead(self) -> float:
        """`padded_bytes / unpadded_bytes - 1`."""
        return self.geometry.padding_overhead

    @property
    def resident_bytes(self) -> int:
        """Bytes currently allocated for resident shards."""
        return self.geometry.padded_nbytes * len(self.resident_shards())

    @staticmethod
    def padding_overhead_for(
        hidden: int,
        intermediate: int,
        max_degree: int,
        dtype_bytes: int,
        granule_bytes: int = DEFAULT_GRANULE_BYTES,
        layers_per_buffer: int = 1,
    ) -> float:
        """Padding overhead (fraction of MLP bytes) of a model configuration. With
        `layers_per_buffer` > 1, one buffer holds shard s of that many layers (an option this
        class does not implement; it shows what packing layers would save)."""
        geometry = ShardGeometry.for_mlp(
            hidden, intermediate, max_degree, dtype_bytes, granule_bytes, layers_per_buffer
        )
        return geometry.padding_overhead

    # -- ownership and residency ---------------------------------------------------------------

    def owned_shards(self, k: int, local_rank: int) -> list[int]:
        """Shards s with s % k == local_rank, ascending (k a power of two <= G)."""
        if not is_power_of_two(k) or k > self.max_degree:
            raise ValueError(f"degree {k!r} must be a power of two <= {self.max_degree}")
        check_local_rank(local_rank, k)
        return list(range(local_rank, self.max_degree, k))

    def resident_shards(self) -> list[int]:
        return [s for s, buf in enumerate(self._buffers) if buf is not None]

    def is_resident(self, shard: int) -> bool:
        self._check_shard(shard)
        return self._buffers[shard] is not None

    def missing_shards(self, k: int, local_rank: int) -> list[int]:
        """Shards owned at (k, local_rank) that are not resident: what a split must restore."""
        return [s for s in self.owned_shards(k, local_rank) if self._buffers[s] is None]

    def release(self, shards: Iterable[int]) -> int:
        """Drop the buffers of `shards`; returns the padded bytes released. All-or-nothing:
        raises ValueError (releasing nothing) if any shard is repeated or not resident."""
        shards = list(shards)
        if len(set(shards)) != len(shards):
            raise ValueError(f"duplicate shards in {shards}")
        for s in shards:
            if not self.is_resident(s):
                raise ValueError(f"shard {s} is not resident")
        for s in shards:
            buf = self._buffers[s]
            self._buffers[s] = None
            self._views[s] = None
            assert buf is not None
            self.allocator.free(s, buf)
        return self.geometry.padded_nbytes * len(shards)

    def release_unowned(self, k: int, local_rank: int) -> int:
        """Release every resident shard not owned at (k, local_rank): the merge step."""
        owned = set(self.owned_shards(k, local_rank))
        return self.release([s for s in self.resident_shards() if s not in owned])

    def restore(self, shard: int, data: torch.Tensor) -> None:
        """Re-materialise a released shard from `data`, the flat buffer of its owner (padded,
        as `shard_buffer` returns it, or just the unpadded prefix)."""
        if self.is_resident(shard):
            raise ValueError(f"shard {shard} is already resident")
        if data.dtype != self.dtype:
            raise ValueError(f"dtype {data.dtype} != {self.dtype}")
        flat = data.reshape(-1)
        if flat.numel() not in (self.geometry.numel, self.geometry.padded_numel):
            raise ValueError(
                f"shard data has {flat.numel()} elements, expected {self.geometry.numel} "
                f"(unpadded) or {self.geometry.padded_numel} (padded)"
            )
        buf = self.allocate_shard(shard)
        buf[: flat.numel()].copy_(flat)
        self._install(shard, buf)

    def allocate_shard(self, shard: int) -> torch.Tensor:
        """A new flat padded buffer for ``shard`` (padding zeroed, contents undefined) to
        receive it into, e.g. straight from a peer; then :meth:`adopt` it. From this
        weight's allocator (on CPU its own anonymous mmap, unmapped at release)."""
        self._check_shard(shard)
        return self.allocator.allocate(shard)

    def adopt(self, shard: int, buf: torch.Tensor) -> None:
        """Re-materialise a released shard by installing `buf`, a buffer from
        :meth:`allocate_shard` whose first `geometry.numel` elements hold the shard's data,
        as its storage (no copy: the restore path of a split that receives in place)."""
        if self.is_resident(shard):
            raise ValueError(f"shard {shard} is already resident")
        if (buf.dtype, buf.device, tuple(buf.shape)) != (
            self.dtype, self.device, (self.geometry.padded_numel,)
        ) or not buf.is_contiguous():
            raise ValueError(
                f"buffer {buf.dtype} {tuple(buf.shape)} on {buf.device} is not a shard "
                f"buffer ({self.dtype} ({self.geometry.padded_numel},) on {self.device}); "
                "use allocate_shard()"
            )
        self._install(shard, buf)

    # -- views ---------------------------------------------------------------------------------

    def shard_buffer(self, shard: int) -> torch.Tensor:
        """The flat padded buffer of a resident shard (what a split sends to a peer)."""
        return self._resident(shard)

    def gate_up(self, shard: int) -> torch.Tensor:
        """`[2R, Hd]` view: gate rows then up rows of the shard's intermediate columns
        (`[E, 2R, Hd]` for experts)."""
        return self._views_of(shard)[0]

    def down_t(self, shard: int) -> torch.Tensor:
        """`[R, Hd]` view: rows of down^T (columns of down) of the shard's columns
        (`[E, R, Hd]` for experts)."""
        return self._views_of(shard)[1]

    def forward(self, x: torch.Tensor, k: int, local_rank: int) -> torch.Tensor:
        """This rank's partial MLP output for `x` `[..., Hd]`; sum over ranks = dense MLP.

        The owned shards' partials are added in ascending shard order, the first one taken
        as is (no zero-initialised accumulator). With one owned shard this is exactly that
        shard's GEMM chain; with several it differs from one dense GEMM over I only by the
        float rounding of the split reduction (see docs/layout.md).
        """
        if self.experts != 1:
            raise ValueError("expert weights are computed by gyges.core.padded_moe.PaddedMoE")
        rows = self.shard_rows
        flat = x.reshape(-1, self.hidden)
        out: torch.Tensor | None = None
        for s in self.owned_shards(k, local_rank):
            gate_up, down_t = self._views_of(s)
            g = F.linear(flat, gate_up)
            partial = torch.mm(self._act(g[:, :rows]) * g[:, rows:], down_t)
            if out is None:
                out = partial
            else:
                out.add_(partial)
        assert out is not None  # every rank owns at least one shard
        return out.view(*x.shape[:-1], self.hidden)

    # -- internals -----------------------------------------------------------------------------

    def _blocks_of(self, buf: torch.Tensor) -> torch.Tensor:
        """`[E, 3R, Hd]` view of a buffer's unpadded prefix."""
        rows, hidden = self.shard_rows, self.hidden
        return buf[: self.experts * 3 * rows * hidden].view(self.experts, 3 * rows, hidden)

    def _install(self, shard: int, buf: torch.Tensor) -> None:
        self._buffers[shard] = buf
        blocks, rows = self._blocks_of(buf), self.shard_rows
        gate_up, down_t = blocks[:, : 2 * rows], blocks[:, 2 * rows :]
        if self.experts == 1:
            gate_up, down_t = gate_up[0], down_t[0]
        self._views[shard] = (gate_up, down_t)

    def _views_of(self, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._resident(shard)
        views = self._views[shard]
        assert views is not None
        return views

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.max_degree:
            raise ValueError(f"shard {shard} out of range [0, {self.max_degree})")

    def _resident(self, shard: int) -> torch.Tensor:
        if not self.is_resident(shard):
            raise ValueError(f"shard {shard} is not resident")
        buf = self._buffers[shard]
        assert buf is not None
        return buf


class PaddedMLP:
    """One layer's :class:`PaddedMLPWeights` bound to this rank's current TP degree and local
    rank: what the engine's MLP forward calls. Boots at degree 1 (all shards, TP1); a merge
    releases shards and then moves the binding with :meth:`set_degree`, a split restores
    them first. The returned output is this rank's partial: at degree k > 1 the engine sums
    the k partials (all-reduce), as it does for a row-parallel down projection.
    """

    def __init__(self, weights: PaddedMLPWeights, degree: int = 1, local_rank: int = 0) -> None:
        self.weights = weights
        self.degree = 1
        self.local_rank = 0
        self.set_degree(degree, local_rank)

    def set_degree(self, k: int, local_rank: int) -> None:
        """Bind to (k, local_rank); raises ValueError if a shard it owns there is missing."""
        missing = self.weights.missing_shards(k, local_rank)
        if missing:
            raise ValueError(
                f"shards {missing} owned at degree {k} by local rank {local_rank} are not "
                "resident; restore them before binding"
            )
        self.degree, self.local_rank = k, local_rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights.forward(x, self.degree, self.local_rank)
