"""int32 offset bound of SGLang's Triton attention kernels on the head-major KV layout.

The decode (stage 1), extend and unified-extend kernels address a KV buffer view
`[S', H', D]` as ``kv_loc * stride(0) + kv_head * stride(1) + d``:

* ``kv_loc`` is loaded from ``kv_indices`` (int64 in SGLang), so the slot term is int64;
* ``kv_head`` comes from ``tl.program_id`` (int32), and ``stride(1)`` is a launch argument
  that Triton specializes to int32 whenever it is below 2**31, so the head term is an int32
  product that wraps silently (wrong KV read, no error) once it reaches 2**31.

On the stock token-major pool the head stride is D, so only the int64 slot term is large.
On the head-major view at degree k (`HeadMajorLayout.merged_view`: strides
`(D, k*S*D, 1)`) the large stride moves to the head term::

    head term   (H/k - 1) * k*S*D  =  (H - k) * S * D       largest at k = 1
    slot term   (k*S - 1) * D
    lane        D - 1
    sum         H*S*D - 1                                   the last storage element, any k

`check_triton_offsets` asks for the conservative form: every element offset of the storage
fits in int32, i.e. ``H*S*D <= 2**31``. That covers the head term at every degree, and
kernels that keep the whole sum in int32. (The exact failure, ``k*S*D < 2**31 <= (H-k)*S*D``,
is not monotonic in S and not worth relying on.) Lanes past D in a power-of-two tile are
masked and never loaded, so they do not count. Plain integer math; no SGLang or Triton import.
"""

from __future__ import annotations

from gyges.core.kv_layout import HeadMajorLayout

__all__ = ["INT32_MAX", "check_triton_offsets", "triton_max_offset", "triton_max_slots"]

INT32_MAX = 2**31 - 1


def triton_max_offset(layout: HeadMajorLayout, k: int = 1) -> int:
    """Largest element offset (from the storage start) a Triton attention kernel computes
    when it reads `layout.merged_view(storage, k)`: head term + slot term + lane. Equals
    `layout.numel - 1` for every valid k; raises ValueError for an invalid degree."""
    layout.check_degree(k)
    h, s, d = layout.shape
    head_term = (h // k - 1) * (k * s * d)
    slot_term = (k * s - 1) * d
    return head_term + slot_term + (d - 1)


def triton_max_slots(num_kv_heads: int, head_dim: int) -> int:
    """Most slots per replica S with `H*S*D <= 2**31`, i.e. with every offset in int32."""
    if num_kv_heads < 1 or head_dim < 1:
        raise ValueError(f"need positive sizes, got H={num_kv_heads}, D={head_dim}")
    return (INT32_MAX + 1) // (num_kv_heads * head_dim)


def check_triton_offsets(layout: HeadMajorLayout) -> None:
    """Raise ValueError unless every degree's largest kernel offset fits in int32 (one
    rank's storage for one layer, K or V: `H*S*D <= 2**31` elements)."""
    worst = max(triton_max_offset(layout, k) for k in _degrees(layout))
    if worst > INT32_MAX:
        h, s, d = layout.shape
        raise ValueError(
            f"head-major KV storage too large for SGLang's Triton attention kernels: "
            f"H={h} KV heads x S={s} slots x D={d} head dim = {layout.numel} elements per "
            f"layer; the kernels address offsets up to {worst}, the head part in int32 "
            f"(max {INT32_MAX}). Use at most "
            f"{triton_max_slots(h, d)} slots per replica (--max-total-tokens)."
        )


def _degrees(layout: HeadMajorLayout) -> list[int]:
    k, out = 1, []
    while k <= layout.max_degree():
        out.append(k)
        k *= 2
    return out
