"""Merge and split cost on the CPU backend: Gyges KV transfer and MLP shard restore vs a naive
token-major transfer and raw collectives of the same bytes.

    PYTHONPATH=python python benchmark/transform_bench.py [--write] [--degrees 2 4] ...

For each degree k, k processes (gloo on loopback, one torch thread each) are k TP1 replicas
that merge into one TP-k instance and split back. Each holds `--layers` layers of K and V
with `--slots` slots, of which `--used-fraction` of the pages (random pages, the same on
every run) hold KV. Timed, each as the slowest rank's wall time, median over `--reps`:

- KV, Gyges: `plan_transformation` + `execute_plan` on head-major `[H, S, D]` storages,
  staged in a workspace allocated once: (a) per layer (`buffers_per_round=2`, pipelined);
  one exchange for all layers; one exchange with staging allocated per call;
- KV, Basic (b): token-major `[S, H, D]` buffers; per layer, K then V, every used page's
  head slices are gathered, sent and scattered page by page (one gloo message per page and
  peer, all of a layer posted before waiting), the way a naive implementation moves KV;
- KV, raw (c): one `alltoall_base` of preallocated flat buffers with Gyges' bytes per peer;
- weights: merge = `release_shards` (nothing copied); split = `restore_shards` (k -> 1),
  vs the same restore packed into one message per rank, vs one raw `all_gather` of the
  same bytes (into a new buffer, as a restore must; and into a reused one).
Basic's and Gyges' merged KV are checked equal once. Memory: about 3x the KV per rank.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from gyges.comm.kv_transfer import execute_plan, workspace_bytes
from gyges.comm.pool import connect_store, new_gloo_group, start_store
from gyges.comm.weight_transfer import release_shards, restore_shards
from gyges.core.kv_layout import HeadMajorLayout
from gyges.core.padded_mlp import PaddedMLPWeights
from gyges.core.transfer_plan import TransferPlan, pages_to_slot_ranges, plan_transformation

DOC = Path(__file__).resolve().parent.parent / "docs" / "transform-bench.md"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--degrees", type=int, nargs="+", default=[2, 4])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--slots", type=int, default=4096, help="KV slots per replica")
    p.add_argument("--used-fraction", type=float, default=0.5)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024, help="MLP hidden size")
    p.add_argument("--intermediate", type=int, default=4096, help="MLP intermediate size")
    p.add_argument("--mlp-layers", type=int, default=4)
    p.add_argument("--granule-bytes", type=int, default=2 * MiB)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--write", action="store_true", help=f"write {DOC.name} under docs/")
    return p.parse_args(argv)


# -- one rank ----------------------------------------------------------------------------------


def used_pages(args: argparse.Namespace, replica: int) -> list[int]:
    pages = args.slots // args.page_size
    rng = random.Random(replica)
    return sorted(rng.sample(range(pages), round(pages * args.used_fraction)))


def timed(pg: dist.ProcessGroup, fn: Callable[[], object]) -> float:
    """Wall ms of `fn` on the slowest rank (all start after a barrier)."""
    _all_reduce_max(pg, torch.zeros(1, dtype=torch.float64))
    t0 = time.perf_counter()
    fn()
    ms = torch.tensor([(time.perf_counter() - t0) * 1000], dtype=torch.float64)
    return _all_reduce_max(pg, ms).item()


def _all_reduce_max(pg: dist.ProcessGroup, t: torch.Tensor) -> torch.Tensor:
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.MAX
    pg.allreduce([t], opts).wait()
    return t


class Basic:
    """Token-major KV moved page by page: per layer `[S, H, D]` (TP1) and `[k*S, H/k, D]`
    (merged) buffers, head slices gathered/scattered per page and sent per page and peer."""

    def __init__(self, args, k, rank, pg, tp1: list[torch.Tensor]) -> None:
        self.k, self.rank, self.pg, self.ps, self.slots = k, rank, pg, args.page_size, args.slots
        self.pages = [used_pages(args, i) for i in range(k)]
        self.heads = [torch.arange(j, args.kv_heads, k) for j in range(k)]
        self.tp1 = tp1
        h, d = args.kv_heads, args.head_dim
        self.merged = [torch.zeros(k * args.slots, h // k, d, dtype=t.dtype) for t in tp1]
        self.chunk = (self.ps, h // k, d)

    def merge(self) -> None:
        r, ps = self.rank, self.ps
        for src, dst in zip(self.tp1, self.merged, strict=True):
            works, recvs, keep = [], [], []
            for p in self.pages[r]:
                rows = src[p * ps : (p + 1) * ps]
                for j in range(self.k):
                    chunk = rows.index_select(1, self.heads[j])
                    if j == r:
                        dst[r * self.slots + p * ps :][:ps] = chunk
                    else:
                        works.append(self.pg.send([chunk], j, p))
                        keep.append(chunk)
            for i in range(self.k):
                for p in self.pages[i] if i != r else ():
                    buf = torch.empty(self.chunk, dtype=dst.dtype)
                    works.append(self.pg.recv([buf], i, p))
                    recvs.append((i * self.slots + p * ps, buf))
            for w in works:
                w.wait()
            for row, buf in recvs:
                dst[row : row + ps] = buf

    def split(self) -> None:
        r, ps = self.rank, self.ps
        for src, dst in zip(self.merged, self.tp1, strict=True):
            works, recvs = [], []
            for i in range(self.k):
                for p in self.pages[i]:
                    rows = src[i * self.slots + p * ps :][:ps]
                    if i == r:
                        dst[p * ps : (p + 1) * ps].index_copy_(1, self.heads[r], rows)
                    else:
                        works.append(self.pg.send([rows], i, p))
            for j in range(self.k):
                for p in self.pages[r] if j != r else ():
                    buf = torch.empty(self.chunk, dtype=dst.dtype)
                    works.append(self.pg.recv([buf], j, p))
                    recvs.append((j, p, buf))
            for w in works:
                w.wait()
            for j, p, buf in recvs:
                dst[p * ps : (p + 1) * ps].index_copy_(1, self.heads[j], buf)


def kv_side(args, k: int, rank: int, pg: dist.ProcessGroup,
            solo: dist.ProcessGroup) -> dict[str, list[float] | int]:
    dtype = DTYPES[args.dtype]
    layout = HeadMajorLayout(args.kv_heads, args.slots, args.head_dim)
    gen = torch.Generator().manual_seed(rank)
    storages = [torch.randn(layout.shape, generator=gen).to(dtype)
                for _ in range(2 * args.layers)]
    original = [s.clone() for s in storages]
    group = tuple(range(k))
    used = {i: pages_to_slot_ranges(used_pages(args, i), args.page_size) for i in range(k)}

    def plan(k_from: int, k_to: int):
        return plan_transformation(group, k_from, k_to, args.kv_heads, used,
                                   slots_per_replica=args.slots)

    basic = Basic(args, k, rank, pg, [layout.tp1_view(s).contiguous() for s in storages])
    out: dict[str, list[float] | int] = {}
    for op, (k_from, k_to) in (("merge", (1, k)), ("split", (k, 1))):
        stats = execute_plan(plan(k_from, k_to), group, rank, pg, storages)
        if op == "merge":  # check Basic against Gyges once, on the used merged slots
            basic.merge()
            rows = torch.cat([i * args.slots + torch.arange(a, b)
                              for i in range(k) for a, b in used[i]])
            for s, m in zip(storages, basic.merged, strict=True):
                assert torch.equal(layout.merged_view(s, k)[rows], m[rows]), "Basic != Gyges"
        else:
            basic.split()
        out[f"{op}_bytes"] = _sum(pg, stats.bytes_sent)
        out[f"{op}_rank_bytes"] = stats.bytes_sent
    mine = torch.cat([torch.arange(a, b) for a, b in used[rank]])  # only used slots return
    for s, o, t in zip(storages, original, basic.tp1, strict=True):
        assert torch.equal(s[:, mine], o[:, mine])
        assert torch.equal(t[mine], o[:, mine].transpose(0, 1))
    del original
    ops = (("merge", (1, k)), ("split", (k, 1)))
    raw = {op: _raw_alltoall(plan(*ks), rank, args, dtype) for op, ks in ops}
    # staging allocated once, as a pool would at startup (sized here for this plan)
    whole = torch.zeros(max(workspace_bytes(plan(*ks), rank, storages) for _, ks in ops),
                        dtype=torch.uint8)
    layer = torch.zeros(max(workspace_bytes(plan(*ks), rank, storages, buffers_per_round=2)
                            for _, ks in ops), dtype=torch.uint8)
    variants = {  # (a) and (c) run back to back: their ratio is taken per rep
        "layer": lambda kf, kt: execute_plan(plan(kf, kt), group, rank, pg, storages,
                                             buffers_per_round=2, workspace=layer),
        "raw": lambda kf, kt: pg.alltoall_base(*raw["merge" if kf == 1 else "split"],
                                               dist.AllToAllOptions()).wait(),
        "gyges": lambda kf, kt: execute_plan(plan(kf, kt), group, rank, pg, storages,
                                             workspace=whole),
        "copies": lambda kf, kt: execute_plan(_in_place(plan(kf, kt), rank), (rank,), rank,
                                              solo, storages, workspace=whole),
        "fresh": lambda kf, kt: execute_plan(plan(kf, kt), group, rank, pg, storages),
        "basic": lambda kf, kt: basic.merge() if kf == 1 else basic.split(),
    }
    for _ in range(args.reps):
        for name, fn in variants.items():  # merge then split: the state returns each time
            for op, (k_from, k_to) in ops:
                ms = timed(pg, lambda fn=fn, kf=k_from, kt=k_to: fn(kf, kt))
                out.setdefault(f"{op}_{name}", []).append(ms)
    return out


def _in_place(plan: TransferPlan, rank: int) -> TransferPlan:
    """What `rank` sends, as moves onto themselves: the pack and unpack copies alone."""
    moves = (m._replace(dst_rank=rank, dst_block=m.src_block) for m in plan.sends(rank))
    return TransferPlan(tuple(m for m in moves), (rank,))


def _raw_alltoall(plan, rank: int, args, dtype) -> tuple:
    """(recv, send, recv splits, send splits): flat uint8 buffers with Gyges' bytes per peer."""
    width = 2 * args.layers * args.head_dim * torch.empty(0, dtype=dtype).element_size()
    pairs = plan.by_pair()
    group = plan.group_ranks
    send = [sum(m.num_slots for m in pairs.get((rank, p), ())) * width for p in group]
    recv = [sum(m.num_slots for m in pairs.get((p, rank), ())) * width for p in group]
    return (torch.empty(sum(recv), dtype=torch.uint8), torch.ones(sum(send), dtype=torch.uint8),
            recv, send)


def weight_side(args, k: int, rank: int, pg: dist.ProcessGroup) -> dict[str, list[float] | int]:
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(100 + rank)
    h, i = args.hidden, args.intermediate
    weights = []
    for _ in range(args.mlp_layers):
        dense = [torch.randn(i, h, generator=gen).to(dtype), torch.randn(i, h, generator=gen)
                 .to(dtype), torch.randn(h, i, generator=gen).to(dtype)]
        weights.append(PaddedMLPWeights(*dense, max_degree=k, granule_bytes=args.granule_bytes))
    geometry = weights[0].geometry
    own = args.mlp_layers * geometry.nbytes  # one shard per layer at degree k
    flat = torch.ones(own // geometry.elem_size, dtype=dtype)
    gathered = torch.zeros(k * flat.numel(), dtype=dtype)
    splits = [0 if p == rank else flat.numel() for p in range(k)]  # own bytes to each peer
    a2a = (torch.zeros(sum(splits), dtype=dtype), torch.ones(sum(splits), dtype=dtype),
           splits, splits)
    out: dict[str, list[float] | int] = {"restore_bytes": 0, "released_bytes": 0}
    for _ in range(args.reps):
        got: list = []  # what the timed calls return: released bytes, restore stats
        out.setdefault("release", []).append(
            timed(pg, lambda got=got: got.append(release_shards(weights, k, rank))))
        out.setdefault("restore", []).append(
            timed(pg, lambda got=got: got.append(restore_shards(weights, k, 1, rank, pg))))
        out.setdefault("all_gather", []).append(timed(pg, lambda: pg._allgather_base(
            torch.empty(k * flat.numel(), dtype=dtype), flat).wait()))
        out["released_bytes"] = _sum(pg, got[0])
        out["restore_bytes"] = _sum(pg, got[1].bytes_received)
        release_shards(weights, k, rank)
        out.setdefault("restore_packed", []).append(
            timed(pg, lambda: _restore_packed(weights, k, rank, pg)))
        out.setdefault("all_gather_reused", []).append(timed(pg, lambda: pg._allgather_base(
            gathered, flat).wait()))
        out.setdefault("all_to_all_reused", []).append(timed(pg, lambda: pg.alltoall_base(
            *a2a, dist.AllToAllOptions()).wait()))
    return out


def _restore_packed(weights: list[PaddedMLPWeights], k: int, rank: int, pg) -> None:
    """k -> 1 restore with one message per rank: pack own shards, all_gather, unpack."""
    numel = weights[0].geometry.numel
    send = torch.cat([w.shard_buffer(rank)[:numel] for w in weights])
    recv = torch.empty(k * send.numel(), dtype=send.dtype)
    pg._allgather_base(recv, send).wait()
    for src in range(k):
        if src == rank:
            continue
        for layer, w in enumerate(weights):
            buf = w.allocate_shard(src)
            start = (src * len(weights) + layer) * numel
            buf[:numel].copy_(recv[start : start + numel])
            w.adopt(src, buf)


def _sum(pg: dist.ProcessGroup, n: int) -> int:
    t = torch.tensor([n], dtype=torch.int64)
    pg.allreduce([t]).wait()
    return int(t.item())


def worker(args: argparse.Namespace, k: int, port: int, rank: int, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    try:
        store = connect_store(port, 120)
        pg = new_gloo_group(store, f"bench{k}", rank, k, 300)
        solo = new_gloo_group(store, f"solo{k}-{rank}", 0, 1, 300)
        result = {**kv_side(args, k, rank, pg, solo), **weight_side(args, k, rank, pg)}
        out.put((rank, result))
    except BaseException as e:  # report instead of hanging the parent
        out.put((rank, repr(e)))
        raise


# -- parent ------------------------------------------------------------------------------------


def run_degree(args: argparse.Namespace, k: int) -> dict:
    store = start_store(120)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "gyges.comm.kv_transfer"])
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(args, k, store.port, r, out)) for r in range(k)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=1800) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
    bad = {r: v for r, v in results.items() if isinstance(v, str)}
    if bad:
        raise RuntimeError(f"degree {k}: ranks failed: {bad}")
    return results[0]


def med(values: list[float]) -> float:
    return statistics.median(values)


def ratio(num: list[float], den: list[float]) -> float:
    """Median over reps of the per-rep ratio (each rep runs both close together, so a load
    swing on the shared box hits both)."""
    return med([n / d for n, d in zip(num, den, strict=True)])


NOTES = """\
## Reading the numbers

- Every figure here is CPU work: gloo over loopback TCP is the kernel copying bytes through
  socket buffers, on the same two cores and memory bus as the packing. Gyges gathers the
  moved rows into one buffer per peer and scatters them on the other side (an
  `index_select` and an `index_copy_` per buffer and peer); "pack + unpack alone" times
  exactly those copies without any communication, and it is about as large as the raw
  all-to-all itself, so (a) ~ (c) + copies. Per-layer rounds are pipelined (layer l+1 is
  packed while layer l is on the wire), but with every rank's main thread and gloo's
  threads on two busy cores there is little idle CPU to overlap with. This is why the
  1.25x goal is missed here. On GPUs the gathers run at HBM bandwidth, several times
  NVLink's and tens of times PCIe's, so the same structure should sit much closer to the
  raw collective; that is not measured (no GPU was available).
- Fresh staging memory is page-faulted in on every call (large CPU allocations are fresh
  mmaps); a workspace allocated once (`workspace_bytes`) avoids it, as the raw
  collectives' preallocated buffers do.
- Basic sends one message per used page and peer for every layer's K and V and gathers the
  head slices of each page; its cost grows with the number of pages (page size 1: per
  token) while Gyges' grows with the bytes.
- Weights: a merge releases shards (an unmap; 0 bytes copied). `restore_shards` sends each
  shard straight from its holder's buffer into the receiver's new buffer; the packed
  variant (one message per rank) adds a copy on each side. A restore must write into new
  memory, which is page-faulted in as it arrives: compare it with the all_gather into a
  new buffer (the goal's baseline); gloo's all_gather is itself slower than an all-to-all
  of the same bytes, which is the tighter bound (last raw column, no page faults).
- The box is shared and loaded (see the load average): figures move by tens of percent
  between runs; ratios within one run are more stable than absolute times.
"""


def render(args: argparse.Namespace, results: dict[int, dict], command: str, loads) -> str:
    es = torch.empty(0, dtype=DTYPES[args.dtype]).element_size()
    kv_rank = 2 * args.layers * args.kv_heads * args.slots * args.head_dim * es
    lines = [
        "# Merge/split transfer cost (CPU, gloo)",
        "",
        "Generated by `benchmark/transform_bench.py` (see its docstring for what each column "
        "does). Command:",
        "",
        f"    {command}",
        "",
        f"Machine: {_machine()}; load average {loads[0]} at start, {loads[1]} at end (the "
        "box is shared: other processes ran meanwhile). One torch thread per rank.",
        "",
        f"KV: {args.layers} layers x K,V of {args.kv_heads} heads x {args.slots} slots x "
        f"{args.head_dim} ({args.dtype}), {kv_rank / MiB:.0f} MiB per replica; "
        f"{args.used_fraction:.0%} of the {args.page_size}-slot pages used (random pages). "
        f"MLP: {args.mlp_layers} layers, hidden {args.hidden}, intermediate "
        f"{args.intermediate}, {args.dtype}, G = k shards. Times: slowest rank, median of "
        f"{args.reps} reps, ms; ratios: median of the per-rep ratios.",
        "",
        "## KV",
        "",
        "| k | op | bytes moved (all ranks) | (a) Gyges, per layer | Gyges, one exchange | "
        "one exchange, fresh staging | pack + unpack alone | (c) raw all-to-all | (b) Basic, "
        "per page | a / c | b / a |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goals = {"kv": [], "basic": [], "weights": []}
    for k, r in results.items():
        for op in ("merge", "split"):
            a, one, fresh, copies, c, b = (
                med(r[f"{op}_{v}"]) for v in ("layer", "gyges", "fresh", "copies", "raw", "basic"))
            a_c, b_a = ratio(r[f"{op}_layer"], r[f"{op}_raw"]), ratio(r[f"{op}_basic"],
                                                                      r[f"{op}_layer"])
            lines.append(f"| {k} | {op} | {r[f'{op}_bytes'] / MiB:.1f} MiB | {a:.1f} | "
                         f"{one:.1f} | {fresh:.1f} | {copies:.1f} | {c:.1f} | {b:.1f} | "
                         f"{a_c:.2f}x | {b_a:.1f}x |")
            goals["kv"].append(f"{a_c:.2f}x (k={k} {op})")
            goals["basic"].append(f"{b_a:.1f}x (k={k} {op})")
    lines += [
        "",
        "## MLP weights",
        "",
        "| k | merge: release | released / copied | split: restore_shards | restore, packed | "
        "raw all_gather, new buffer | raw all_gather, reused buffer | raw all-to-all, reused "
        "buffers | bytes restored (all ranks) | restore / all_gather (new) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k, r in results.items():
        rest, packed = med(r["restore"]), med(r["restore_packed"])
        ag, ag_reused, a2a = (med(r[v]) for v in ("all_gather", "all_gather_reused",
                                                  "all_to_all_reused"))
        lines.append(f"| {k} | {med(r['release']):.2f} ms | {r['released_bytes'] / MiB:.0f} "
                     f"MiB / 0 B | {rest:.1f} | {packed:.1f} | {ag:.1f} | {ag_reused:.1f} | "
                     f"{a2a:.1f} | {r['restore_bytes'] / MiB:.0f} MiB | "
                     f"{ratio(r['restore'], r['all_gather']):.2f}x |")
        goals["weights"].append(f"{ratio(r['restore'], r['all_gather']):.2f}x (k={k})")
    lines += [
        "",
        "## Goals",
        "",
        f"- KV transfer within 1.25x of the raw collective (a / c): {', '.join(goals['kv'])}.",
        f"- KV at least 5x faster than Basic (b / a): {', '.join(goals['basic'])}.",
        f"- Weight restore within 1.25x of a raw all_gather: {', '.join(goals['weights'])}.",
        "",
        NOTES,
    ]
    return "\n".join(lines)


def _machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({model}), torch {torch.__version__}, no GPU"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "PYTHONPATH=python python benchmark/transform_bench.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    loads = [f"{os.getloadavg()[0]:.1f}"]
    results = {k: run_degree(args, k) for k in args.degrees}
    loads.append(f"{os.getloadavg()[0]:.1f}")
    text = render(args, results, command.strip(), loads)
    print(text)
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
