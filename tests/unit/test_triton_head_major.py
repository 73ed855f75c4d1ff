"""SGLang's Triton decode and extend kernels read the head-major KV views in place.

Issue 16, item 1 (unit part). The kernels run in the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) in one subprocess, `triton_head_major_worker.py`: the
variable is read when triton is imported, and this process imports triton through sglang
already. For each pool geometry (MHA D=16; GQA 4 q/KV head with D=24; GQA 2 with page size 16;
MHA fp16), every valid degree k (1, 2, 4 for H=4) and every local rank, the worker runs
``decode_attention_fwd``, ``extend_attention_fwd`` and ``extend_attention_fwd_unified`` on the
rank's `HeadMajorLayout.merged_view` (strides `(D, k*S*D, 1)`, no copy), for requests of
different lengths on scattered slots, and compares each output with

* a float64 softmax reference on the logical (contiguous, all-heads) KV, and
* SGLang's ``TorchNativeAttnBackend._run_sdpa_forward_decode/_extend`` loops on the same view,
  raw and through gyges' `SlotGather` hook.

The int32 offset bound of those kernels on this layout: test_triton_bounds.py.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import gyges

HERE = Path(__file__).resolve().parent
CASES = ("mha_d16", "gqa4_d24", "gqa2_page16", "mha_fp16")
KERNELS = ("decode", "extend", "extend_unified")
TOL = {"torch.float32": 1e-5, "torch.float16": 2e-3}


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    """All kernel runs of the worker (about 20 s: interpreter start-up plus 85 kernel runs)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(Path(gyges.__file__).parents[1]),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "triton_head_major_worker.py")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _runs(records: list[dict[str, Any]], case: str, kernel: str) -> list[dict[str, Any]]:
    return [r for r in records if r["case"] == case and r["kernel"] == kernel]


def test_every_degree_and_rank_ran(records: list[dict[str, Any]]) -> None:
    for case in CASES:
        for kernel in KERNELS:
            got = sorted((r["k"], r["rank"]) for r in _runs(records, case, kernel))
            assert got == [(k, r) for k in (1, 2, 4) for r in range(k)], (case, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference_and_torch_native(records: list[dict[str, Any]], case: str,
                                                   kernel: str) -> None:
    for run in _runs(records, case, kernel):
        where = f"{case} {kernel} k={run['k']} rank={run['rank']}"
        assert run["view_ok"], f"{where}: view is not the storage with strides (D, k*S*D, 1)"
        tol = TOL[run["dtype"]]
        for key in ("err_ref", "err_native", "err_gather", "native_ref"):
            assert run[key] <= tol, f"{where}: {key} = {run[key]:.3g} > {tol}"


def test_token_major_strides_on_the_same_memory_do_not_match(
        records: list[dict[str, Any]]) -> None:
    # Negative control: the comparisons above can tell a misaddressed read.
    (run,) = _runs(records, "mha_d16", "decode_wrong_strides")
    assert math.isnan(run["err_ref"]) or run["err_ref"] > 0.1
