"""Worker for test_triton_head_major: runs SGLang's Triton decode and extend kernels in the
Triton interpreter on head-major KV views and prints one JSON list of per-run errors.

Run it only as a subprocess with ``TRITON_INTERPRET=1`` in the environment: the variable is
read when triton is imported, and the pytest process has imported triton already (through
sglang). Per case and degree k it builds the logical KV of a degree-k merged instance (k*S
merged slots, all H KV heads), stores each local rank's share with `HeadMajorLayout`
(`block_of`, `merged_slot`), and on that rank's `merged_view` runs

* ``decode_attention_fwd`` (3 requests, one long enough for two KV splits),
* ``extend_attention_fwd`` (prefix from the pool, new tokens written through the view first
  and passed as contiguous k/v, as SGLang's Triton backend does), and
* ``extend_attention_fwd_unified`` (prefix and new tokens both read from the pool),

comparing each with a float64 softmax reference on the logical data and with SGLang's
``TorchNativeAttnBackend._run_sdpa_forward_*`` loops on the same view (raw, and through the
gyges `SlotGather` hook). Slots no request uses hold NaN, so a misaddressed read fails loudly.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (read when triton is imported)")

import torch  # noqa: E402
from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd  # noqa: E402
from sglang.kernels.ops.attention.extend_attention import (  # noqa: E402
    extend_attention_fwd,
    extend_attention_fwd_unified,
)
from sglang.srt.layers.attention.torch_native_backend import (  # noqa: E402
    TorchNativeAttnBackend,
)

from gyges.core.attention_shards import owned_q_heads  # noqa: E402
from gyges.core.kv_layout import HeadMajorLayout  # noqa: E402
from gyges.hooks.torch_native_backend import SlotGather  # noqa: E402

DECODE_LENS = (5, 40, 1)      # 40 > MIN_BLOCK_KV (32): the long request uses two KV splits
PREFIX_LENS = (0, 20, 7)
EXTEND_LENS = (6, 9, 1)
MAX_KV_SPLITS = 4


@dataclass(frozen=True)
class Case:
    """One pool geometry: H KV heads, g q heads per KV head, S slots per replica, head dim D."""

    name: str
    num_kv_heads: int
    group: int
    slots: int
    head_dim: int
    page: int
    dtype: torch.dtype


CASES = (
    Case("mha_d16", 4, 1, 48, 16, 1, torch.float32),
    Case("gqa4_d24", 4, 4, 48, 24, 1, torch.float32),      # D not a power of two: masked lanes
    Case("gqa2_page16", 4, 2, 80, 16, 16, torch.float32),  # PAGE_SIZE=16 address math
    Case("mha_fp16", 4, 1, 48, 16, 1, torch.float16),
)


def _allocate(m: int, lens: list[int], page: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random, non-contiguous slots in [0, m) for requests of `lens` tokens, page-aligned
    (tokens in order inside randomly chosen pages) when page > 1."""
    pages = torch.randperm(m // page, generator=gen).tolist()
    out = []
    for n in lens:
        need = -(-n // page)
        mine, pages = pages[:need], pages[need:]
        slots = [p * page + t for p in mine for t in range(page)][:n]
        out.append(torch.tensor(slots, dtype=torch.int64))
    return out


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int,
               scale: float) -> torch.Tensor:
    """Causal softmax attention in float64: q [n, Hq, D], k/v [L, H, D]; query j sits at
    position offset + j."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(k.shape[0])
    s = s.masked_fill(pos[None, :] > offset + torch.arange(q.shape[0])[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def _indptr(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)


class Pool:
    """Logical degree-k KV (`[k*S, H, D]`, NaN where unused) and one rank's head-major share."""

    def __init__(self, case: Case, k: int, used: torch.Tensor, gen: torch.Generator) -> None:
        self.layout = HeadMajorLayout(case.num_kv_heads, case.slots, case.head_dim)
        m = k * case.slots
        shape = (m, case.num_kv_heads, case.head_dim)
        self.k_log = torch.full(shape, float("nan"), dtype=case.dtype)
        self.v_log = torch.full(shape, float("nan"), dtype=case.dtype)
        self.k_log[used] = torch.randn(len(used), *shape[1:], generator=gen).to(case.dtype)
        self.v_log[used] = torch.randn(len(used), *shape[1:], generator=gen).to(case.dtype)
        self.case, self.k = case, k

    def rank_views(self, r: int, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Rank r's K and V views, filled from the logical KV except the slots in `skip`
        (those stay NaN). Also whether both views alias their storage with the layout's
        strides (no copy)."""
        lay, k, s = self.layout, self.k, self.case.slots
        views, ok = [], True
        for log in (self.k_log, self.v_log):
            storage = lay.allocate(self.case.dtype).fill_(float("nan"))
            for h in lay.owned_heads(k, r):
                for i in range(k):
                    lo = lay.merged_slot(i, 0, k)
                    storage[lay.block_of(h, i, k)] = log[lo:lo + s, h]
            view = lay.merged_view(storage, k)
            view[skip] = float("nan")
            ok &= (view.data_ptr() == storage.data_ptr()
                   and view.stride() == (lay.head_dim, k * s * lay.head_dim, 1)
                   and view.shape == (k * s, lay.num_kv_heads // k, lay.head_dim))
            views.append(view)
        return views[0], views[1], ok


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max())


def _native(decode: bool, q: torch.Tensor, k_cache: Any, v_cache: Any,
            slots: list[torch.Tensor], prefix: list[int], ext: list[int],
            scale: float, gqa: bool) -> torch.Tensor:
    """SGLang's torch_native SDPA loop (no backend state is used without sliding window)."""
    backend = object.__new__(TorchNativeAttnBackend)
    req_to_token = torch.zeros(len(slots), max(len(s) for s in slots), dtype=torch.int64)
    for b, s in enumerate(slots):
        req_to_token[b, :len(s)] = s
    reqs = torch.arange(len(slots))
    seq_lens = torch.tensor([len(s) for s in slots])
    out = torch.zeros_like(q)
    if decode:
        backend._run_sdpa_forward_decode(q, out, k_cache, v_cache, req_to_token, reqs, seq_lens,
                                         scaling=scale, enable_gqa=gqa)
    else:
        backend._run_sdpa_forward_extend(q, out, k_cache, v_cache, req_to_token, reqs, seq_lens,
                                         torch.tensor(prefix), torch.tensor(ext), scaling=scale,
                                         enable_gqa=gqa, causal=True)
    return out


def _record(case: Case, k: int, r: int, kernel: str, out: torch.Tensor, ref: torch.Tensor,
            native: torch.Tensor, gather: torch.Tensor, view_ok: bool) -> dict[str, Any]:
    return {"case": case.name, "k": k, "rank": r, "kernel": kernel, "view_ok": view_ok,
            "dtype": str(case.dtype), "err_ref": _err(out, ref), "err_native": _err(out, native),
            "err_gather": _err(out, gather), "native_ref": _err(native, ref)}


def run_decode(case: Case, k: int, gen: torch.Generator) -> list[dict[str, Any]]:
    lens = list(DECODE_LENS)
    slots = _allocate(k * case.slots, lens, case.page, gen)
    pool = Pool(case, k, torch.cat(slots), gen)
    hq, d = case.num_kv_heads * case.group, case.head_dim
    scale = d ** -0.5
    q_log = torch.randn(len(lens), hq, d, generator=gen).to(case.dtype)
    ref = torch.cat([_reference(q_log[b:b + 1], pool.k_log[s], pool.v_log[s], len(s) - 1, scale)
                     for b, s in enumerate(slots)])
    indptr, indices = _indptr(lens), torch.cat(slots)
    records = []
    for r in range(k):
        kv, vv, ok = pool.rank_views(r, torch.empty(0, dtype=torch.int64))
        heads = owned_q_heads(hq, case.num_kv_heads, k, r)
        q = q_log[:, heads].contiguous()
        out = torch.zeros_like(q)
        logits = torch.empty(len(lens), len(heads), MAX_KV_SPLITS, d, dtype=torch.float32)
        lse = torch.empty(len(lens), len(heads), MAX_KV_SPLITS, dtype=torch.float32)
        splits = torch.tensor([1, 2, MAX_KV_SPLITS], dtype=torch.int32)
        decode_attention_fwd(q, kv, vv, out, indptr, indices, logits, lse, splits, MAX_KV_SPLITS,
                             scale, 1.0, 1.0, page_size=case.page)
        gqa = case.group > 1
        native = _native(True, q, kv, vv, slots, [], [], scale, gqa)
        gather = _native(True, q, SlotGather(kv), SlotGather(vv), slots, [], [], scale, gqa)
        records.append(_record(case, k, r, "decode", out, ref[:, heads], native, gather, ok))
        if case is CASES[0] and k == 2 and r == 0:
            # negative control: the same memory read token-major ([S', H', D] contiguous
            # strides) must NOT match, or the comparisons above could not catch misaddressing
            wrong = [x.permute(1, 0, 2).reshape(x.shape) for x in (kv, vv)]
            bad = torch.zeros_like(q)
            decode_attention_fwd(q, *wrong, bad, indptr, indices, logits, lse, splits,
                                 MAX_KV_SPLITS, scale, 1.0, 1.0)
            records.append(_record(case, k, r, "decode_wrong_strides", bad, ref[:, heads],
                                   native, gather, ok))
    return records


def run_extend(case: Case, k: int, gen: torch.Generator) -> list[dict[str, Any]]:
    prefix, ext = list(PREFIX_LENS), list(EXTEND_LENS)
    lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    slots = _allocate(k * case.slots, lens, case.page, gen)
    pool = Pool(case, k, torch.cat(slots), gen)
    hq, d = case.num_kv_heads * case.group, case.head_dim
    scale = d ** -0.5
    q_log = torch.randn(sum(ext), hq, d, generator=gen).to(case.dtype)
    qo_indptr = _indptr(ext)
    ref = torch.cat([_reference(q_log[qo_indptr[b]:qo_indptr[b + 1]], pool.k_log[s],
                                pool.v_log[s], prefix[b], scale) for b, s in enumerate(slots)])
    pre_slots = torch.cat([s[:p] for s, p in zip(slots, prefix, strict=True)])
    new_slots = torch.cat([s[p:] for s, p in zip(slots, prefix, strict=True)])
    records = []
    for r in range(k):
        kv, vv, ok = pool.rank_views(r, new_slots)
        kvh = pool.layout.owned_heads(k, r)
        k_new = pool.k_log[new_slots][:, kvh].contiguous()
        v_new = pool.v_log[new_slots][:, kvh].contiguous()
        kv[new_slots], vv[new_slots] = k_new, v_new  # set_kv_buffer through the view
        heads = owned_q_heads(hq, case.num_kv_heads, k, r)
        q = q_log[:, heads].contiguous()
        out = torch.zeros_like(q)
        extend_attention_fwd(q, k_new, v_new, out, kv, vv, qo_indptr, _indptr(prefix), pre_slots,
                             None, True, None, max(ext), 1.0, 1.0, sm_scale=scale,
                             page_size=case.page)
        gqa = case.group > 1
        native = _native(False, q, kv, vv, slots, prefix, ext, scale, gqa)
        gather = _native(False, q, SlotGather(kv), SlotGather(vv), slots, prefix, ext, scale, gqa)
        records.append(_record(case, k, r, "extend", out, ref[:, heads], native, gather, ok))
        out_u = torch.zeros_like(q)
        extend_attention_fwd_unified(q, out_u, kv, vv, 1.0, 1.0, qo_indptr, _indptr(lens),
                                     torch.cat(slots), torch.tensor(prefix, dtype=torch.int32),
                                     max(ext), sm_scale=scale, is_causal=True,
                                     page_size=case.page)
        records.append(_record(case, k, r, "extend_unified", out_u, ref[:, heads], native,
                               gather, ok))
    return records


def degrees(num_kv_heads: int) -> list[int]:
    """Every valid merged degree: the powers of two dividing H."""
    return [k for k in (1, 2, 4, 8, 16) if num_kv_heads % k == 0]


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=RuntimeWarning)  # -inf - -inf in empty splits
    records: list[dict[str, Any]] = []
    for n, case in enumerate(CASES):
        for k in degrees(case.num_kv_heads):
            gen = torch.Generator().manual_seed(1000 * n + k)
            records += run_decode(case, k, gen)
            records += run_extend(case, k, gen)
    print(json.dumps(records))


if __name__ == "__main__":
    main()
