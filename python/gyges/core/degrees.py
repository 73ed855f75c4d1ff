"""TP degree checks as plain integer math (no torch), shared by the layout, the policy, the
transfer plans and the fleet simulator."""

from __future__ import annotations

from numbers import Integral


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return isinstance(n, Integral) and not isinstance(n, bool) and n >= 1 and (n & (n - 1)) == 0


def check_degree(k: int, num_kv_heads: int) -> None:
    """Raise ValueError unless k is a valid TP degree for `num_kv_heads` KV heads:
    a power of two that divides the head count (so k <= num_kv_heads)."""
    if not is_power_of_two(k):
        raise ValueError(f"TP degree must be a power of two >= 1, got {k!r}")
    if num_kv_heads % k != 0:
        raise ValueError(
            f"TP degree {k} does not divide the number of KV heads ({num_kv_heads}); "
            f"the largest usable degree is the largest power of two dividing {num_kv_heads}"
        )


def check_local_rank(local_rank: int, k: int) -> None:
    """Raise ValueError unless 0 <= local_rank < k."""
    if not 0 <= local_rank < k:
        raise ValueError(f"local rank {local_rank} out of range for degree {k}")
