"""GPU specifications (public datasheet peaks; SXM parts, dense bf16)."""

from __future__ import annotations

from dataclasses import dataclass

from gyges.sim.models import SimInputError

GB = 1e9
GIB = 2**30


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bw: float  # bytes/s
    memory: float  # bytes
    nvlink_bw: float  # bytes/s per direction per GPU


BUILTIN: dict[str, GpuSpec] = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOPS dense bf16, 3.35 TB/s HBM3, 80 GB,
    # NVLink 4 900 GB/s bidirectional (450 GB/s each way).
    "h100": GpuSpec("h100", 989e12, 3.35e12, 80 * GIB, 450 * GB),
    # NVIDIA H200 SXM datasheet: same compute, 4.8 TB/s HBM3e, 141 GB, same NVLink.
    "h200": GpuSpec("h200", 989e12, 4.8e12, 141 * GB, 450 * GB),
}


def builtin_gpu(name: str) -> GpuSpec:
    try:
        return BUILTIN[name]
    except KeyError:
        raise SimInputError(f"unknown GPU {name!r}; choose one of {sorted(BUILTIN)} "
                            "or pass --calibration FILE") from None
