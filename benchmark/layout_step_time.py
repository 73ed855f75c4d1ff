"""Prefill and decode step time: head-major KV pool + padded MLP (Gyges) vs stock SGLang.

    python benchmark/layout_step_time.py [--rounds 3] [--batch-sizes 1 8] [--input-len 256]

Each measurement drives SGLang's own ModelRunner through ``sglang.benchmark.one_batch``
(``load_model`` and ``latency_test_run_once``: one prefill step of the whole batch, then
decode steps; SGLang's scheduler and HTTP layers are not involved). One child process per
variant, because the layout is chosen at model load:

- stock: plain SGLang, the plugin filtered out with SGLANG_PLUGINS (no hook registered);
- gyges: the plugin loaded and the config of one replica of a ``--dp-size 2
  --enable-gyges`` server (max TP 2: two MLP shards, head-major KV pool).

Children of the two variants alternate (the order flips every round) so load drift on a
shared machine hits both; each child does a warm-up run, then ``--reps`` runs per batch
size. Reported: medians and minima over all runs of all rounds; also the MLP forward alone
(layer 0, decode and prefill shapes), so the whole-step ratio does not hide the MLP's cost.
One torch thread, as one DP rank of a CPU server has one core.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NO_PLUGINS = "__gyges_disabled__"
VARIANTS = ("stock", "gyges")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="llama", choices=("llama", "qwen2", "qwen3"))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=16)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--granule-bytes", type=int, default=2 * 1024 * 1024)
    p.add_argument("--rounds", type=int, default=3, help="child processes per variant")
    p.add_argument("--reps", type=int, default=3, help="runs per batch size in a child")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- parent -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    from gyges.testing.server import tiny_model

    model = tiny_model(arch=args.arch, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       kv_heads=args.kv_heads, head_dim=args.head_dim,
                       intermediate=args.intermediate)
    samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            t0 = time.monotonic()
            samples[variant].extend(run_child(args, variant, model))
            print(f"round {r}: {variant} child done in {time.monotonic() - t0:.0f} s",
                  file=sys.stderr)
    print(report(args, samples))


def run_child(args: argparse.Namespace, variant: str, model: Path) -> list[dict]:
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1", OMP_NUM_THREADS="1")
    if variant == "stock":
        env["SGLANG_PLUGINS"] = NO_PLUGINS
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant, "--model", str(model),
               "--out", out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} child failed:\n{proc.stdout[-3000:]}"
                               f"\n{proc.stderr[-6000:]}")
        return json.loads(Path(out.name).read_text())


def report(args: argparse.Namespace, samples: dict[str, list[dict]]) -> str:
    """Median and minimum over runs. Other processes on a shared machine only ever add
    time, so the ratio of minima is the steadier estimate of the intrinsic cost."""
    def values(variant: str, key: str, bs: int) -> list[float]:
        return [s[key] for s in samples[variant] if s["batch_size"] == bs]

    rows = ["| batch | what | stock median | gyges median | ratio of medians "
            "| ratio of minima |", "|---|---|---|---|---|---|"]
    for bs in args.batch_sizes:
        for key, label in (("prefill_ms", f"prefill step, {args.input_len} tok/req (ms)"),
                           ("decode_ms", "decode step (ms)"),
                           ("mlp_prefill_us", "MLP forward, prefill shape (us)"),
                           ("mlp_decode_us", "MLP forward, decode shape (us)")):
            s, g = values("stock", key, bs), values("gyges", key, bs)
            ms, mg = statistics.median(s), statistics.median(g)
            rows.append(f"| {bs} | {label} | {ms:.3f} | {mg:.3f} | {mg / ms:.3f} "
                        f"| {min(g) / min(s):.3f} |")
    n = {v: len(samples[v]) // len(args.batch_sizes) for v in VARIANTS}
    return "\n".join(rows) + f"\n\nruns per batch size and variant: {n}"


# -- child ------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)
    from sglang.srt.plugins import load_plugins

    load_plugins()  # stock: SGLANG_PLUGINS filters every plugin out
    runner, vocab = load_runner(args)
    results = []
    for bs in args.batch_sizes:
        for rep in range(args.reps + 1):  # rep 0 warms up
            res = run_once(runner, vocab, bs, args)
            if rep:
                res.update(mlp_times(runner, bs, args))
                results.append(res)
    Path(args.out).write_text(json.dumps(results))


def load_runner(args: argparse.Namespace):
    from sglang.benchmark import one_batch as ob
    from sglang.srt.runtime_context import SpawnRanks, publish, spawn_world_rank
    from sglang.srt.server_args import PortArgs, ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args([
        "--model-path", args.model, "--device", "cpu", "--attention-backend", "torch_native",
        "--dtype", "float32", "--mem-fraction-static", "0.05",
        "--max-total-tokens", str(max(args.batch_sizes) * (args.input_len + args.output_len)
                                  + 1024),
        "--page-size", str(args.page_size),
    ])
    server_args = ServerArgs.from_cli_args(ns)
    if args.child == "gyges":
        from gyges.config import GygesConfig
        from gyges.hooks.server_args import ATTR

        config = GygesConfig.build(enabled=True, tp_size=1, dp_size=2, max_tp=2,
                                   policy="gyges", num_kv_heads=args.kv_heads,
                                   granule_bytes=args.granule_bytes)
        setattr(server_args, ATTR, config)  # one replica of a --dp-size 2 Gyges server
    server_args.resolve_once()
    ob._set_envs_and_config(server_args)
    port_args = PortArgs.init_new(server_args)
    publish(server_args, role="scheduler",
            ranks=SpawnRanks(world_rank=spawn_world_rank(server_args, tp_rank=0, pp_rank=0),
                             gpu_id=0))
    ob._init_process_global_configs()
    runner, tokenizer = ob.load_model(server_args, port_args, 0, 0)
    pool = runner.torch_runner.token_to_kv_pool
    model = runner.torch_runner.model
    layout = (getattr(pool, "gyges_kv_layout", "token_major"),
              getattr(model, "gyges_mlp_storage", "dense"))
    want = ("head_major", "padded") if args.child == "gyges" else ("token_major", "dense")
    if layout != want:
        raise RuntimeError(f"{args.child}: got {layout}, expected {want}")
    return runner, runner.torch_runner.model_config.vocab_size


def run_once(runner, vocab: int, bs: int, args: argparse.Namespace) -> dict:
    import numpy as np
    from sglang.benchmark import one_batch as ob

    ids = np.random.default_rng(bs).integers(5, vocab, (bs, args.input_len)).tolist()
    reqs = ob.prepare_synthetic_inputs_for_latency_test(bs, args.input_len, ids)
    res = ob.latency_test_run_once("layout", runner, lambda *a, **k: None, reqs, bs,
                                   args.input_len, args.output_len, 0, False, False, ("CPU",),
                                   "", "all", 0)
    return {"batch_size": bs, "prefill_ms": res["prefill_latency"] * 1e3,
            "decode_ms": res["median_decode_latency"] * 1e3}


def mlp_times(runner, bs: int, args: argparse.Namespace, budget_s: float = 0.25) -> dict:
    """Layer 0's MLP alone: the best of 5 blocks of calls, each block about budget_s/5."""
    import torch

    mlp = runner.torch_runner.model.model.layers[0].mlp
    out = {}
    for key, tokens in (("mlp_decode_us", bs), ("mlp_prefill_us", bs * args.input_len)):
        x = torch.randn(tokens, args.hidden)
        with torch.no_grad():
            t0 = time.perf_counter()
            mlp(x)
            iters = max(1, int(budget_s / 5 / max(time.perf_counter() - t0, 1e-6)))
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(iters):
                    mlp(x)
                best = min(best, (time.perf_counter() - t0) / iters)
        out[key] = best * 1e6
    return out


if __name__ == "__main__":
    main()
