"""The head-major KV pool: ``sglang.srt.mem_cache.memory_pool.MHATokenToKVPool`` with each
layer's K and V stored head-major (:class:`gyges.core.kv_layout.HeadMajorLayout`).

Per layer, K (and V) is one contiguous ``[H_kv, S, D]`` storage (S = size + page_size, as
SGLang's pool) and SGLang sees its TP1 view ``[S, H_kv, D]`` with strides ``(D, S*D, 1)``:
no copy, slot indexing as before. Only buffer creation and the paths that assume token-major
rows differ from the parent; those that cannot work on the strided view refuse loudly.

It is not a patch: :mod:`gyges.hooks.kv_cache_configurator` selects this class, and only
under ``--enable-gyges``. It imports SGLang at module level, so import it lazily.
"""
from __future__ import annotations

from typing import Any

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from gyges.core.kv_layout import HeadMajorLayout
from gyges.core.triton_bounds import check_triton_offsets


class HeadMajorKVPool(MHATokenToKVPool):
    """Keeps the head-major storages reachable for merge/split as ``gyges_k_storage[l]`` and
    ``gyges_v_storage[l]`` (local layer index l); ``k_buffer[l]``/``v_buffer[l]`` are their
    TP1 views, so writes through either land in the same memory.

    Works with backends that index the pool by slot (torch_native) or honour its strides.
    Refused here: quantized/FP4 KV, the CUDA-VMM post-capture pool, SGLANG_USE_HND_KVCACHE
    and other physical layouts, PD-disaggregation transfer and HiCache/host pools (they
    address the pool as token-major rows). The fused CUDA store kernels are bypassed.
    """

    gyges_kv_layout = "head_major"
    # While a transformation pre-copies the KV (gyges.switch.precopy): bool per slot of the
    # current view, set for every slot written since; None otherwise.
    gyges_written: torch.Tensor | None = None

    def __init__(self, *args: Any, enable_kv_cache_copy: bool = False,
                 kv_cache_layout: str | None = None, **kwargs: Any) -> None:
        if kv_cache_layout is not None:
            raise NotImplementedError(
                f"gyges: the head-major KV pool has its own layout; {kv_cache_layout!r} "
                "cannot be combined with --enable-gyges"
            )
        # enable_kv_cache_copy is dropped: the tiled slot-copy kernel assumes token-major
        # rows (stride == row bytes); slot moves index the views (_move_kv_cache_impl).
        super().__init__(*args, enable_kv_cache_copy=False, **kwargs)

    # -- buffers ---------------------------------------------------------------------------

    def _create_buffers(self) -> None:
        self._refuse_unsupported()
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None
        slots = self.size + self.page_size
        self.gyges_k_layout = HeadMajorLayout(self.head_num, slots, self.head_dim)
        self.gyges_v_layout = HeadMajorLayout(self.head_num, slots, self.v_head_dim)
        _check_backend_bounds(self.gyges_k_layout, self.gyges_v_layout)
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.gyges_k_storage = [self.gyges_k_layout.allocate(self.store_dtype, self.device)
                                    for _ in range(self.layer_num)]
            self.gyges_v_storage = [self.gyges_v_layout.allocate(self.store_dtype, self.device)
                                    for _ in range(self.layer_num)]
        self.k_buffer = [self.gyges_k_layout.tp1_view(s) for s in self.gyges_k_storage]
        self.v_buffer = [self.gyges_v_layout.tp1_view(s) for s in self.gyges_v_storage]
        # Base pointers are the storages' (a view starts where its storage does). The
        # per-slot stride table of the tiled copy kernel has no meaning here: left unset.
        self.k_data_ptrs = torch.tensor([x.data_ptr() for x in self.k_buffer],
                                        dtype=torch.uint64, device=self.device)
        self.v_data_ptrs = torch.tensor([x.data_ptr() for x in self.v_buffer],
                                        dtype=torch.uint64, device=self.device)
        self.data_ptrs = self.data_strides = None

    def _refuse_unsupported(self) -> None:
        reasons = []
        if self.is_quantized_kv_cache:
            reasons.append("a quantized KV cache")
        if self.post_capture_active:
            reasons.append("the post-capture (CUDA VMM) KV pool")
        if self.use_hnd or self.kv_cache_layout != "nhd":
            reasons.append(f"the {self.kv_cache_layout!r} KV layout")
        if reasons:
            raise NotImplementedError(
                f"gyges: the head-major KV pool does not support {' or '.join(reasons)}"
            )

    def _clear_buffers(self) -> None:
        super()._clear_buffers()
        del self.gyges_k_storage
        del self.gyges_v_storage

    # -- writes and moves ------------------------------------------------------------------

    def _store_kv_layer(self, layer_idx: int, loc: torch.Tensor, cache_k: torch.Tensor,
                        cache_v: torch.Tensor) -> None:
        # index_put on the strided view scatters straight into the [H, S, D] storage. The
        # fused store kernels (CUDA, XPU, CPU AMX) assume token-major rows.
        self.k_buffer[layer_idx][loc] = cache_k
        self.v_buffer[layer_idx][loc] = cache_v
        if self.gyges_written is not None:
            self.gyges_written[loc] = True

    def _move_kv_cache_impl(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        if tgt_loc.numel() == 0:
            return
        tgt, src = tgt_loc.reshape(-1).long(), src_loc.reshape(-1).long()
        if self.gyges_written is not None:
            self.gyges_written[tgt] = True
        for k_buf, v_buf in zip(self.k_buffer, self.v_buffer, strict=True):
            k_buf[tgt] = k_buf[src]
            v_buf[tgt] = v_buf[src]

    def set_kv_buffer_prefix_valid(self, layer: Any, loc_2d: torch.Tensor,
                                   commit_lens: torch.Tensor, cache_k: torch.Tensor,
                                   cache_v: torch.Tensor, k_scale: float | None = None,
                                   v_scale: float | None = None,
                                   layer_id_override: int | None = None) -> None:
        """Write the first ``commit_lens[b]`` rows of each ``loc_2d[b]`` (the parent's
        device-independent path; its CUDA kernel assumes token-major rows)."""
        if loc_2d.ndim != 2 or commit_lens.shape != loc_2d.shape[:1]:
            raise ValueError(f"bad prefix-valid write: loc_2d {tuple(loc_2d.shape)}, "
                             f"commit_lens {tuple(commit_lens.shape)}")
        device = self.k_buffer[0].device
        loc_2d, commit_lens = loc_2d.to(device).long(), commit_lens.to(device).long()
        offsets = torch.arange(loc_2d.shape[1], device=device)
        valid = torch.nonzero((offsets[None, :] < commit_lens[:, None]).reshape(-1)).flatten()
        if valid.numel() == 0:
            return
        self.set_kv_buffer(layer, loc_2d.reshape(-1).index_select(0, valid),
                           cache_k.index_select(0, valid), cache_v.index_select(0, valid),
                           k_scale, v_scale,
                           layer_id_override=(layer_id_override if layer_id_override is not None
                                              else layer.layer_id))

    # -- consumers that address the pool as token-major rows --------------------------------

    def get_contiguous_buf_infos(self) -> Any:
        raise NotImplementedError(
            "gyges: PD-disaggregation KV transfer assumes token-major rows; it is not "
            "supported with the head-major KV pool (--enable-gyges)"
        )

    def get_device_pool_infos(self) -> Any:
        raise NotImplementedError(
            "gyges: HiCache / host KV pools assume token-major rows; they are not supported "
            "with the head-major KV pool (--enable-gyges)"
        )


def _check_backend_bounds(*layouts: HeadMajorLayout) -> None:
    """Refuse a pool the configured attention backend cannot address (sizes in the error):
    SGLang's Triton kernels keep the head offset in int32 (:mod:`gyges.core.triton_bounds`)."""
    from sglang.srt.runtime_context import attention_backends

    try:
        backends = attention_backends()
    except ValueError:  # no published server config: a pool built in-process (tests)
        backends = ()
    if "triton" in backends:
        for layout in layouts:
            check_triton_offsets(layout)
