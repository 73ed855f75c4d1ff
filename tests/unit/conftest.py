"""Fast unit tier: tiny tensors only. One intra-op thread: on a loaded 2-core machine torch's
OpenMP workers spin-wait and make these tests ~5x slower, with nothing to gain."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
