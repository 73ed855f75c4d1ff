"""The shard allocator seam of the padded MLP (``gyges.core.shard_allocator``): every
buffer the weight uses comes from its allocator and goes back to it on release, so a
device allocator (CUDA VMM) can plug in without touching the callers."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gyges.core.padded_mlp import PaddedMLPWeights, ShardGeometry
from gyges.core.shard_allocator import (
    MmapShardAllocator,
    TorchShardAllocator,
    default_allocator,
)

HIDDEN, INTER, G, GRANULE = 16, 64, 4, 1024


class Recording:
    """A stand-in device allocator: torch.empty buffers, every call recorded."""

    def __init__(self, geometry: ShardGeometry, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.inner = TorchShardAllocator(geometry, dtype, device)
        self.calls: list[tuple[str, int, int]] = []

    def allocate(self, shard: int) -> torch.Tensor:
        buf = self.inner.allocate(shard)
        self.calls.append(("allocate", shard, buf.data_ptr()))
        return buf

    def free(self, shard: int, buf: torch.Tensor) -> None:
        self.calls.append(("free", shard, buf.data_ptr()))


def _dense() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(INTER, HIDDEN, generator=gen), torch.randn(INTER, HIDDEN, generator=gen),
            torch.randn(HIDDEN, INTER, generator=gen))


def test_every_buffer_comes_from_and_returns_to_the_allocator() -> None:
    made: list[Recording] = []

    def factory(geometry, dtype, device):
        made.append(Recording(geometry, dtype, device))
        return made[-1]

    gate, up, down = _dense()
    w = PaddedMLPWeights(gate, up, down, G, GRANULE, allocator=factory)
    rec = made[0]
    assert [c[:2] for c in rec.calls] == [("allocate", s) for s in range(G)]
    ptrs = {s: w.shard_buffer(s).data_ptr() for s in range(G)}
    assert all(ptrs[s] == rec.calls[s][2] for s in range(G))
    assert w.release_unowned(2, 0) == 2 * w.geometry.padded_nbytes
    assert rec.calls[G:] == [("free", 1, ptrs[1]), ("free", 3, ptrs[3])]
    w.restore(1, torch.cat([gate[16:32].reshape(-1), up[16:32].reshape(-1),
                            down[:, 16:32].t().reshape(-1)]))
    assert rec.calls[-1][:2] == ("allocate", 1)
    buf = w.allocate_shard(3)
    assert rec.calls[-1][:2] == ("allocate", 3) and not buf[w.geometry.numel:].any()
    x = torch.randn(5, HIDDEN)
    want = (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()
    buf[: w.geometry.numel].copy_(torch.cat([gate[48:].reshape(-1), up[48:].reshape(-1),
                                             down[:, 48:].t().reshape(-1)]))
    w.adopt(3, buf)
    got = w.forward(x, 1, 0)
    assert got is not None and torch.allclose(got, want, atol=1e-4)


def test_default_is_mmap_on_cpu_with_zero_padding() -> None:
    geometry = ShardGeometry.for_mlp(HIDDEN, INTER, G, 4, 2048)  # 3072 B of 4096
    alloc = default_allocator(geometry, torch.float32, torch.device("cpu"))
    assert isinstance(alloc, MmapShardAllocator)
    buf = alloc.allocate(0)
    assert buf.numel() == geometry.padded_numel and buf.is_contiguous()
    assert not buf[geometry.numel:].any() and geometry.padded_numel > geometry.numel
