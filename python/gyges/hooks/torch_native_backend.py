"""Hook on ``sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend``.

Its SDPA loops read the KV pool only as ``cache[slots].movedim(0, 1)`` per request. On the
head-major pool that gather works through the strided view but copies element-wise; with
the pool's layout the hook hands the loops a stand-in whose ``[slots]`` gathers whole
``D``-rows per head (:func:`gyges.core.kv_layout.gather_slots`). Same values, so the same
attention output; inert for any other pool.
"""
from __future__ import annotations

from typing import Any

import torch

from gyges.core.kv_layout import gather_slots

TARGET = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
METHODS = ("_run_sdpa_forward_extend", "_run_sdpa_forward_decode")


class SlotGather:
    """Stands in for a head-major K or V buffer inside the SDPA loops."""

    __slots__ = ("view",)

    def __init__(self, view: torch.Tensor) -> None:
        self.view = view

    def __getitem__(self, slots: torch.Tensor) -> torch.Tensor:
        return gather_slots(self.view, slots)


def around_run_sdpa(original: Any, backend: Any, query: torch.Tensor, output: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, *args: Any,
                    **kwargs: Any) -> Any:
    if getattr(backend.token_to_kv_pool, "gyges_kv_layout", None) == "head_major":
        k_cache, v_cache = SlotGather(k_cache), SlotGather(v_cache)
    return original(backend, query, output, k_cache, v_cache, *args, **kwargs)
