"""Test-only SGLang plugin (entry point ``gyges_cpu_deterministic``): lets SGLang's own
``--enable-deterministic-inference`` start on this CPU machine, so that seeded sampling
(``sampling_seed``, temperature > 0) can be compared with stock SGLang across a merge.

SGLang's deterministic mode samples each token from (seed, position)
(``sampler.multinomial_with_seed``, in torch, on any device) and, at model load, registers
batch-invariant Triton kernels for matmul and log-softmax on the CUDA/XPU dispatch key
(``ModelRunner.maybe_enable_batch_invariant_mode``). The latter raises "No supported
accelerator (CUDA/XPU) available" on CPU; its kernels would not apply to CPU tensors
anyway. This plugin skips that one call on a CPU device. The seeded sampler's hash
(``murmur_hash32``) calls sgl-kernel's CPU op ``murmur_hash32_cpu`` on CPU tensors, which
this machine's sgl-kernel stand-in lacks; the plugin defines that op by running SGLang's own
Triton kernel (the one CUDA runs) under Triton's interpreter, so it needs
``TRITON_INTERPRET=1``. Nothing else changes.

Inert unless ``GYGES_TEST_CPU_DETERMINISTIC=1``; loaded beside the ``gyges`` plugin, or alone
in a stock server (``SGLANG_PLUGINS=gyges_cpu_deterministic``). Not for serving.
"""
from __future__ import annotations

import logging
import os
from typing import Any

ENV = "GYGES_TEST_CPU_DETERMINISTIC"
PLUGIN = "gyges_cpu_deterministic"
TARGET = ("sglang.srt.model_executor.model_runner.ModelRunner."
          "maybe_enable_batch_invariant_mode")

logger = logging.getLogger(__name__)


def around_batch_invariant_mode(original: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    """Skip the batch-invariant kernels on CPU (see the module docstring)."""
    if str(getattr(runner, "device", "")) == "cpu":
        logger.warning("%s=1: batch-invariant kernels skipped on CPU (test only)", ENV)
        return None
    return original(runner, *args, **kwargs)


def murmur_hash32_interpreted(seed: Any, positions: Any, col_indices: Any) -> Any:
    """``sgl_kernel::murmur_hash32_cpu`` through SGLang's Triton ``murmur_hash32_kernel``
    (grid and block as SGLang launches it on CUDA)."""
    import torch
    import triton
    from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32_kernel

    n, m = seed.shape[0], col_indices.shape[0]
    hashed = torch.empty((n, m), dtype=torch.uint32)
    block = 1024
    murmur_hash32_kernel[(n, triton.cdiv(m, block))](
        seed.contiguous(), positions.contiguous(), col_indices.contiguous(), hashed, n, m,
        BLOCK_SIZE=block)
    return hashed


_LIBRARY: Any = None


def _define_murmur_hash32_cpu() -> None:
    global _LIBRARY
    import torch

    if _LIBRARY is not None or hasattr(torch.ops.sgl_kernel, "murmur_hash32_cpu"):
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        logger.warning("%s=1 without TRITON_INTERPRET=1: sgl_kernel::murmur_hash32_cpu "
                       "not defined (seeded sampling on CPU will fail)", ENV)
        return
    _LIBRARY = torch.library.Library("sgl_kernel", "FRAGMENT")
    _LIBRARY.define("murmur_hash32_cpu(Tensor seed, Tensor positions, Tensor col_indices)"
                    " -> Tensor")
    _LIBRARY.impl("murmur_hash32_cpu", murmur_hash32_interpreted, "CPU")

    # SGLang calls it inside torch.compile: its shape, for tracing
    @torch.library.register_fake("sgl_kernel::murmur_hash32_cpu", lib=_LIBRARY)
    def _shape(seed: Any, positions: Any, col_indices: Any) -> Any:
        return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=torch.uint32)


def load() -> None:
    if os.environ.get(ENV) != "1":
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, around_batch_invariant_mode, HookType.AROUND)
    _define_murmur_hash32_cpu()
