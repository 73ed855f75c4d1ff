"""Sizes of the padded MLP shards (see ``padded_mlp``) as plain integer math (no torch), so
the fleet simulator plans memory with the same geometry the server allocates."""

from __future__ import annotations

from dataclasses import dataclass

from gyges.core.degrees import is_power_of_two

DEFAULT_GRANULE_BYTES = 2 * 1024 * 1024  # CUDA VMM allocation granularity


@dataclass(frozen=True)
class ShardGeometry:
    """Sizes of one MLP shard. Invariant: `padded_numel * elem_size` is a multiple of
    `granule_bytes` and `padded_numel >= numel`."""

    hidden: int
    rows: int  # R = I / G intermediate columns per shard
    elem_size: int
    granule_bytes: int
    # [3R, Hd] blocks in one buffer: layers packed together (an option the server does not
    # use) or the experts of one MoE layer (gyges.core.padded_moe)
    layers_per_buffer: int = 1

    @classmethod
    def for_mlp(
        cls,
        hidden: int,
        intermediate: int,
        max_degree: int,
        elem_size: int,
        granule_bytes: int = DEFAULT_GRANULE_BYTES,
        layers_per_buffer: int = 1,
    ) -> ShardGeometry:
        """Validate the configuration and build its geometry."""
        if hidden < 1 or intermediate < 1 or elem_size < 1 or layers_per_buffer < 1:
            raise ValueError("hidden, intermediate, elem_size and layers_per_buffer must be >= 1")
        if not is_power_of_two(max_degree):
            raise ValueError(f"max degree must be a power of two, got {max_degree!r}")
        if intermediate % max_degree != 0:
            raise ValueError(
                f"intermediate size {intermediate} is not divisible by max degree {max_degree}"
            )
        if granule_bytes < 1 or granule_bytes % elem_size != 0:
            raise ValueError(
                f"granule_bytes {granule_bytes} must be a positive multiple of the element "
                f"size {elem_size}"
            )
        return cls(hidden, intermediate // max_degree, elem_size, granule_bytes, layers_per_buffer)

    @property
    def numel(self) -> int:
        """Unpadded elements: gate, up and down rows of every layer in the buffer."""
        return 3 * self.rows * self.hidden * self.layers_per_buffer

    @property
    def padded_numel(self) -> int:
        granule = self.granule_bytes // self.elem_size
        return -(-self.numel // granule) * granule

    @property
    def nbytes(self) -> int:
        return self.numel * self.elem_size

    @property
    def padded_nbytes(self) -> int:
        return self.padded_numel * self.elem_size

    @property
    def padding_overhead(self) -> float:
        """Padding as a fraction of the unpadded bytes."""
        return (self.padded_numel - self.numel) / self.numel
