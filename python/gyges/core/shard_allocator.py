"""Where padded MLP shard buffers live: the allocator seam of :mod:`gyges.core.padded_mlp`.

A :class:`ShardAllocator` serves one padded weight (one layer's MLP): it hands out the flat
buffer of shard ``s`` and takes it back on release. Invariant: a released shard's memory
is returned to the system at once (the point of padding: a merge lowers resident memory by
exactly the released bytes), and the padding past ``geometry.numel`` reads as zeros.

Built here: :class:`MmapShardAllocator` (CPU: one anonymous mmap per shard, unmapped when
the buffer is dropped) and :class:`TorchShardAllocator` (any other device: ``torch.empty``;
its memory goes back to PyTorch's caching allocator, not to the driver). A CUDA VMM
allocator (one reserved virtual range per padded weight, one physical allocation per
shard at the driver's granularity, unmapped on release and remapped at the same address
on restore, as SGLang's ``srt/utils/cuda_vmm_utils.py`` does) plugs in behind the same
two methods; it is not written: it needs a GPU to be checked.
"""
from __future__ import annotations

import mmap
from typing import Protocol

import torch

from gyges.core.shard_geometry import ShardGeometry


class ShardAllocator(Protocol):
    """Buffers of one padded weight's shards."""

    def allocate(self, shard: int) -> torch.Tensor:
        """A flat buffer of ``geometry.padded_numel`` elements for ``shard``: contiguous,
        padding zeroed, contents before it undefined."""
        ...

    def free(self, shard: int, buf: torch.Tensor) -> None:
        """``shard``'s buffer is no longer used by the weight (the caller drops its views)."""
        ...


class MmapShardAllocator:
    """CPU: each shard its own anonymous mmap, so dropping it unmaps the pages at once
    (glibc malloc may keep freed chunks below its dynamic mmap threshold in the heap,
    where RSS never shrinks). Fresh mmap pages are zero, padding included."""

    def __init__(self, geometry: ShardGeometry, dtype: torch.dtype) -> None:
        self.geometry, self.dtype = geometry, dtype

    def allocate(self, shard: int) -> torch.Tensor:
        return torch.frombuffer(mmap.mmap(-1, self.geometry.padded_nbytes), dtype=self.dtype)

    def free(self, shard: int, buf: torch.Tensor) -> None:
        return None  # the mmap is unmapped when its last view is dropped


class TorchShardAllocator:
    """Any device through ``torch.empty`` (padding zeroed explicitly)."""

    def __init__(self, geometry: ShardGeometry, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.geometry, self.dtype, self.device = geometry, dtype, device

    def allocate(self, shard: int) -> torch.Tensor:
        buf = torch.empty(self.geometry.padded_numel, dtype=self.dtype, device=self.device)
        buf[self.geometry.numel:].zero_()
        return buf

    def free(self, shard: int, buf: torch.Tensor) -> None:
        return None


def default_allocator(geometry: ShardGeometry, dtype: torch.dtype,
                      device: torch.device) -> ShardAllocator:
    """The mmap allocator on CPU, ``torch.empty`` elsewhere."""
    if device.type == "cpu":
        return MmapShardAllocator(geometry, dtype)
    return TorchShardAllocator(geometry, dtype, device)
