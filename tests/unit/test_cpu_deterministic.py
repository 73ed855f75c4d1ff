"""The test-only plugin ``gyges.testing.cpu_deterministic``: its ``murmur_hash32_cpu`` (SGLang's
Triton kernel under the interpreter) equals MurmurHash3 written out here, and SGLang's seeded
sampler draws through it the same token for the same (seed, position) whatever the batch.

In a subprocess: ``TRITON_INTERPRET`` is read when triton is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_WORKER = """
import json, torch
from gyges.testing import cpu_deterministic
cpu_deterministic._define_murmur_hash32_cpu()
from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32
from sglang.srt.layers.sampler import multinomial_with_seed
seeds = torch.tensor([0, 1234, 2**40 + 7], dtype=torch.int64)
pos = torch.tensor([0, 5, 300], dtype=torch.int64)
cols = torch.arange(1500)
h = murmur_hash32(seeds.to(torch.uint64), pos, cols)
lp = torch.log_softmax(torch.randn(3, 1500, generator=torch.Generator().manual_seed(0),
                                   dtype=torch.float64), -1)
batch = multinomial_with_seed(lp, seeds, pos).view(-1).tolist()
alone = [multinomial_with_seed(lp[i:i + 1], seeds[i:i + 1], pos[i:i + 1]).item()
         for i in range(3)]
print(json.dumps({"hash": [[int(x) for x in row[:40]] + [int(row[-1])] for row in h],
                  "dtype": str(h.dtype), "batch": batch, "alone": alone}))
"""


def _mix(h: int, k: int) -> int:
    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & 0xFFFFFFFF
    k = rotl((k * 0xCC9E2D51) & 0xFFFFFFFF, 15)
    h ^= (k * 0x1B873593) & 0xFFFFFFFF
    return (rotl(h, 13) * 5 + 0xE6546B64) & 0xFFFFFFFF


def _murmur3(seed: int, position: int, col: int) -> int:
    h = 0
    for k in (seed & 0xFFFFFFFF, seed >> 32, position, col):
        h = _mix(h, k)
    h ^= 16
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def test_interpreted_murmur_hash_and_seeded_sampler() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "GYGES_TEST_CPU_DETERMINISTIC": "1"}
    out = subprocess.run([sys.executable, "-c", _WORKER], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dtype"] == "torch.uint32"
    for (seed, pos), row in zip([(0, 0), (1234, 5), (2**40 + 7, 300)], got["hash"],
                                strict=True):
        cols = [*range(40), 1499]
        assert row == [_murmur3(seed, pos, c) for c in cols], (seed, pos)
    assert got["batch"] == got["alone"]
