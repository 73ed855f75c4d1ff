"""HeadMajorKVPool inside SGLang's real pool class, in process (no server).

In the server tier because it imports SGLang (15-25 s on the CPU box); it builds the pool
directly, as SGLang's configurator does, and checks that every write path lands in the
head-major storage and that the paths assuming token-major rows refuse loudly.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
memory_pool = pytest.importorskip("gyges.hooks.memory_pool")
HeadMajorKVPool = memory_pool.HeadMajorKVPool

H, D, LAYERS = 4, 8, 2


class _Layer:
    def __init__(self, layer_id: int) -> None:
        self.layer_id = layer_id


def _pool(size: int = 64, page_size: int = 16, **kw) -> HeadMajorKVPool:
    return HeadMajorKVPool(size=size, page_size=page_size, dtype=torch.float32, head_num=H,
                           head_dim=D, layer_num=LAYERS, device="cpu",
                           enable_memory_saver=False, **kw)


@pytest.mark.parametrize("page_size", [1, 16])
def test_buffers_are_views_of_head_major_storage(page_size: int) -> None:
    pool = _pool(page_size=page_size, enable_kv_cache_copy=True)
    slots = 64 + page_size
    assert pool.gyges_kv_layout == "head_major"
    for layer in range(LAYERS):
        for storage, view in ((pool.gyges_k_storage[layer], pool.k_buffer[layer]),
                              (pool.gyges_v_storage[layer], pool.v_buffer[layer])):
            assert storage.shape == (H, slots, D) and storage.is_contiguous()
            assert view.shape == (slots, H, D) and view.stride() == (D, slots * D, 1)
            assert view.data_ptr() == storage.data_ptr()
        assert pool.get_key_buffer(layer).data_ptr() == pool.gyges_k_storage[layer].data_ptr()
    assert pool.get_kv_size_bytes() == (LAYERS * H * slots * D * 4,) * 2


def test_writes_moves_and_cpu_copies_land_in_storage() -> None:
    pool = _pool()
    gen = torch.Generator().manual_seed(0)
    loc = torch.tensor([3, 17, 40, 79])
    k, v = torch.randn(4, H, D, generator=gen), torch.randn(4, H, D, generator=gen)
    pool.set_kv_buffer(_Layer(1), loc, k, v)
    for i, slot in enumerate(loc.tolist()):
        assert torch.equal(pool.gyges_k_storage[1][:, slot], k[i])  # head-major: [h, slot]
        assert torch.equal(pool.gyges_v_storage[1][:, slot], v[i])
    assert torch.count_nonzero(pool.gyges_k_storage[0]) == 0

    pool.move_kv_cache(torch.tensor([5, 6]), torch.tensor([3, 40]))
    assert torch.equal(pool.gyges_k_storage[1][:, 5], k[0])
    assert torch.equal(pool.gyges_v_storage[1][:, 6], v[2])

    saved = pool.get_cpu_copy(torch.tensor([5, 6, 17]))
    pool.gyges_k_storage[1].zero_()
    pool.load_cpu_copy(saved, torch.tensor([8, 9, 10]))
    assert torch.equal(pool.gyges_k_storage[1][:, 10], k[1])

    # prefix-valid commit: only the first commit_lens[b] rows of each row of loc_2d
    loc_2d = torch.tensor([[20, 21, 22], [30, 31, 32]])
    kk = torch.randn(6, H, D, generator=gen)
    pool.set_kv_buffer_prefix_valid(_Layer(0), loc_2d, torch.tensor([2, 1]), kk, kk.clone())
    written = {20: 0, 21: 1, 30: 3}
    for slot in (20, 21, 22, 30, 31, 32):
        got = pool.gyges_k_storage[0][:, slot]
        assert torch.equal(got, kk[written[slot]]) if slot in written else not got.any()


def test_token_major_consumers_refuse() -> None:
    pool = _pool()
    with pytest.raises(NotImplementedError, match="PD-disaggregation"):
        pool.get_contiguous_buf_infos()
    with pytest.raises(NotImplementedError, match="HiCache"):
        pool.get_device_pool_infos()
    with pytest.raises(NotImplementedError, match="own layout"):
        _pool(kv_cache_layout="page_major_layer_major")
    # a reshape that merges the strided head axis cannot be a view: it fails, loudly
    with pytest.raises(RuntimeError):
        pool.k_buffer[0].view(pool.k_buffer[0].shape[0], -1)
