"""Owned intermediate columns of a dense (unpadded) MLP at degree k.

The MLP's intermediate dimension I is cut into G = max_tp equal shards of I/G columns;
local rank r of a degree-k instance owns the shards s with s % k == r, the same ownership as
`padded_mlp.PaddedMLPWeights`, so a dense model and a padded one compute the same partial
sums on the same rank::

    I = 8, G = 4, k = 2:   shards  [0 1 | 2 3 | 4 5 | 6 7]
                           rank 0 owns shards 0, 2 -> columns 0 1 4 5
                           rank 1 owns shards 1, 3 -> columns 2 3 6 7
"""
from __future__ import annotations

import torch

from gyges.core.kv_layout import check_local_rank, is_power_of_two


def owned_mlp_columns(intermediate: int, num_shards: int, k: int, local_rank: int) -> torch.Tensor:
    """int64 indices of the intermediate columns a rank owns (ascending, I/k of them)."""
    if not is_power_of_two(num_shards) or not is_power_of_two(k) or k > num_shards:
        raise ValueError(f"degree {k} and shard count {num_shards} must be powers of two "
                         "with degree <= shards")
    check_local_rank(local_rank, k)
    if intermediate % num_shards:
        raise ValueError(f"MLP intermediate size {intermediate} is not divisible into "
                         f"{num_shards} shards")
    width = intermediate // num_shards
    shards = torch.arange(local_rank, num_shards, k)
    return (shards[:, None] * width + torch.arange(width)).reshape(-1)
