"""``calibrate --url URL --out FILE``: measure a live Gyges server, fit :class:`CostParams`.

Per degree k (1, 2, .. max TP; every aligned group merged through ``POST /gyges/merge``):
prefill time (a request with ``max_new_tokens=1``: the request's own overhead plus the
prefill step) at a few prompt lengths, and the decode step at batch 1 and at batch 4 per
instance (the difference between requests of 33 and 1 new tokens, over 32: steps only).
Each point is the median of ``--repeats`` samples, every sample with prompts no earlier
request used (a repeated prompt would hit the prefix cache).
Then merges and splits with and without a request in flight, from the admin API's own
report (``elapsed_ms.total_ms``, ``kv_bytes_moved``). The fit: per-request overhead, step
overhead, effective FLOP/s, effective memory bandwidth and all-reduce floor by
Nelder-Mead in log space on the squared log error of every point; the
transformation's fixed cost and bandwidth by least squares on (bytes, ms). KV capacity:
the server's configured ``capacity_tokens`` per replica (``kv_tokens_tp1``: every plan
holds k x that). The device and overlap scheduler (``/server_info``) set
``first_token_lag_steps``: 1 for SGLang's overlap scheduler on a CPU, 0 otherwise. The file
holds the params, every measurement and the fit error per point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gyges.sim.cost import ALLREDUCE_SCALINGS, CostParams, MemoryPlan, StepCost
from gyges.sim.models import ModelSpec, SimInputError, model_from_hf

PROMPTS = (32, 256, 1024)
DECODE_TOKENS = 32
DECODE_BATCHES = (1, 4)


class Server:
    def __init__(self, url: str, api_key: str | None) -> None:
        self.url, self.key = url.rstrip("/"), api_key

    def call(self, path: str, body: dict[str, Any] | None = None,
             timeout: float = 300.0) -> dict[str, Any]:
        req = urllib.request.Request(self.url + path, method="POST" if body is not None
                                     else "GET", data=None if body is None
                                     else json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            raise SimInputError(f"{path}: HTTP {e.code}: {e.read()[:200]!r}") from None
        except (urllib.error.URLError, OSError) as e:
            raise SimInputError(f"cannot reach {self.url}{path}: {e}") from None

    def generate(self, prompt: int, new: int, vocab: int, salt: int = 0) -> float:
        """Seconds of one greedy request; ``salt`` varies the prompt: prompts of different
        salts (below ``(vocab - 10) ** 3``) share at most two leading tokens."""
        ids = _prompt(prompt, vocab, salt)
        t0 = time.perf_counter()
        self.call("/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": new, "temperature": 0.0, "ignore_eos": True}})
        return time.perf_counter() - t0

    def generate_many(self, n: int, prompt: int, new: int, vocab: int, salt: int = 0) -> float:
        """Seconds until ``n`` concurrent requests (prompts salted ``salt``, ``salt + 1``,
        ...: distinct) all finished."""
        if n == 1:
            return self.generate(prompt, new, vocab, salt)
        errors: list[BaseException] = []

        def one(i: int) -> None:
            try:
                self.generate(prompt, new, vocab, salt=salt + i)
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=300)
        if errors:
            raise errors[0]
        return time.perf_counter() - t0


def _prompt(n: int, vocab: int, salt: int) -> list[int]:
    """``n`` token ids: the salt's three digits in base ``vocab - 10``, then a pattern."""
    base = max(vocab - 10, 2)
    head = [salt // base**j % base + 5 for j in (2, 1, 0)]
    return (head + [(7 * i + 3) % base + 5 for i in range(n)])[:n]


def _set_degree(srv: Server, dp: int, k: int) -> None:
    """Every aligned group of k ranks merged (pairwise), anything larger split back."""
    while True:
        big = [i for i in srv.call("/gyges/status")["instances"] if i["tp"] > k]
        if not big:
            break
        srv.call("/gyges/split", {"ranks": big[0]["ranks"]})
    size = 2
    while size <= k:
        tps = {i["ranks"][0]: i["tp"] for i in srv.call("/gyges/status")["instances"]}
        for start in range(0, dp, size):
            if tps.get(start, 0) < size:
                srv.call("/gyges/merge", {"ranks": list(range(start, start + size))})
        size *= 2


def serving_path(info: dict[str, Any]) -> dict[str, Any]:
    """Device and overlap scheduler of the server, from SGLang's ``/server_info``."""
    args = info.get("server_args", info)
    return {"device": str(args.get("device") or "cuda"),
            "overlap_schedule": not bool(args.get("disable_overlap_schedule", False))}


def first_token_lag_steps(serving: dict[str, Any] | None) -> float:
    """One step where SGLang's overlap scheduler runs on a CPU (the launch of the next step
    runs it whole before the prefill's result is processed), else 0."""
    if not serving:
        return 0.0
    return 1.0 if serving["device"] == "cpu" and serving["overlap_schedule"] else 0.0


def host_cores(serving: dict[str, Any] | None) -> float:
    """The cores a CPU server's processes share (0 on GPUs, or where not recorded)."""
    if not serving or serving["device"] != "cpu":
        return 0.0
    return float(serving.get("host_cores") or 0.0)


def measure(srv: Server, model: ModelSpec, repeats: int) -> dict[str, Any]:
    """Every point is the median of ``repeats`` samples (the simulator predicts typical
    times, p50s), each sample with prompts no earlier request used: a repeated prompt would
    hit the prefix cache and time a one-token prefill."""
    next_salt = 1

    def median_of(sample: Callable[[int], float], width: int = 1) -> tuple[float, list[float]]:
        nonlocal next_salt
        xs = []
        for _ in range(repeats):
            xs.append(sample(next_salt))
            next_salt += width  # generate_many salts its n prompts salt, salt + 1, ...
        return statistics.median(xs), xs

    status = srv.call("/gyges/status")
    serving = serving_path(srv.call("/server_info"))
    dp, max_tp = int(status["dp_size"]), int(status["max_tp"])
    cap1 = min(i["capacity_tokens"] // i["tp"] for i in status["instances"])
    steps: list[dict[str, Any]] = []
    k = 1
    while k <= max_tp:
        _set_degree(srv, dp, k)
        srv.generate(16, 2, model.vocab)  # warm up
        for p in PROMPTS:
            if p + DECODE_TOKENS < cap1:
                t, xs = median_of(lambda salt, p=p: srv.generate(p, 1, model.vocab, salt))
                steps.append({"kind": "prefill", "k": k, "tokens": p, "s": t,
                              "samples": xs})
        for batch in DECODE_BATCHES:
            if batch * (64 + DECODE_TOKENS + 1) >= k * cap1:
                continue
            # batch > 1: that many per instance on every instance (the controller spreads
            # them), all running at once as in serving
            n = batch * (dp // k) if batch > 1 else 1
            one, ones = median_of(lambda salt, n=n: srv.generate_many(n, 64, 1, model.vocab,
                                                                      salt), n)
            many, manys = median_of(lambda salt, n=n: srv.generate_many(
                n, 64, DECODE_TOKENS + 1, model.vocab, salt), n)
            steps.append({"kind": "decode", "k": k, "batch": batch,
                          "ctx": batch * (64 + DECODE_TOKENS // 2),
                          "s": max(many - one, 1e-6) / DECODE_TOKENS,
                          "samples": {"one": ones, "many": manys}})
        k *= 2
    _set_degree(srv, dp, 1)
    transforms = []
    for busy in (False, True):
        for op in ("merge", "split"):
            th = None
            if busy:
                prompt = max(16, min(cap1 // 2, 1500))
                th = threading.Thread(target=srv.generate, args=(prompt, 200, model.vocab))
                th.start()
                time.sleep(1.0)
            reply = srv.call(f"/gyges/{op}", {"ranks": [0, 1]})
            transforms.append({"op": op, "busy": busy,
                               "kv_bytes": int(reply.get("kv_bytes_moved", 0)),
                               "weight_bytes": int(reply.get("weight_bytes_restored", 0)),
                               "ms": float(reply.get("elapsed_ms", {}).get("total_ms", 0.0))})
            if th is not None:
                th.join()
    return {"dp_size": dp, "max_tp": max_tp, "capacity_tokens_tp1": cap1, "steps": steps,
            "transforms": transforms, "serving": serving}


def _predict(cost: StepCost, pt: dict[str, Any]) -> float:
    """A prefill point is a whole request (its overhead + the prefill step); a decode point
    is a difference of two requests' times: steps only."""
    if pt["kind"] == "prefill":  # the request also decodes in the step launched meanwhile
        lag = cost.p.first_token_lag_steps * cost.decode(pt["k"], 1, pt["tokens"])
        return cost.p.request_overhead_s + lag + cost.prefill(pt["k"], pt["tokens"],
                                                              pt["tokens"] ** 2 / 2, 1)
    return cost.decode(pt["k"], pt["batch"], pt["ctx"])


FIT_KEYS = ("step_overhead_s", "flops", "hbm_bw", "allreduce_latency_s", "request_overhead_s")


def fit(model: ModelSpec, base: CostParams, points: list[dict[str, Any]]
        ) -> tuple[CostParams, list[float]]:
    """Nelder-Mead in log space; returns the params and each point's relative error."""
    def loss(p: CostParams) -> float:
        c = StepCost(model, p)
        return sum(math.log(max(_predict(c, pt), 1e-9) / pt["s"]) ** 2 for pt in points)

    keys = FIT_KEYS
    x = [math.log(getattr(base, k)) for k in keys]

    def at(v: list[float]) -> float:
        return loss(base.with_(**{k: math.exp(a) for k, a in zip(keys, v, strict=True)}))

    # Nelder-Mead in log space, restarted once from its own optimum.
    for _ in range(2):
        simplex = [x] + [[a + (0.7 if i == j else 0.0) for j, a in enumerate(x)]
                         for i in range(len(x))]
        vals = [at(v) for v in simplex]
        for _ in range(400):
            order = sorted(range(len(simplex)), key=lambda i: vals[i])
            simplex, vals = [simplex[i] for i in order], [vals[i] for i in order]
            if vals[-1] - vals[0] < 1e-12:
                break
            centre = [sum(v[j] for v in simplex[:-1]) / (len(simplex) - 1)
                      for j in range(len(x))]
            worst = simplex[-1]
            refl = [c + (c - w) for c, w in zip(centre, worst, strict=True)]
            fr = at(refl)
            if fr < vals[0]:
                exp = [c + 2 * (c - w) for c, w in zip(centre, worst, strict=True)]
                fe = at(exp)
                simplex[-1], vals[-1] = (exp, fe) if fe < fr else (refl, fr)
            elif fr < vals[-2]:
                simplex[-1], vals[-1] = refl, fr
            else:
                con = [c + 0.5 * (w - c) for c, w in zip(centre, worst, strict=True)]
                fc = at(con)
                if fc < vals[-1]:
                    simplex[-1], vals[-1] = con, fc
                else:
                    simplex = [simplex[0]] + [[b + 0.5 * (a - b) for a, b in
                                               zip(v, simplex[0], strict=True)]
                                              for v in simplex[1:]]
                    vals = [vals[0]] + [at(v) for v in simplex[1:]]
        x = simplex[min(range(len(vals)), key=lambda i: vals[i])]
    best = base.with_(**{k: math.exp(a) for k, a in zip(keys, x, strict=True)})
    c = StepCost(model, best)
    return best, [_predict(c, pt) / pt["s"] - 1 for pt in points]


def fit_transforms(points: list[dict[str, Any]]) -> tuple[float, float]:
    """(fixed seconds, bytes/s) from ms = fixed + bytes / bw (least squares)."""
    xs = [p["kv_bytes"] + p["weight_bytes"] for p in points]
    ys = [p["ms"] / 1000 for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0
    if slope <= 0:
        return max(my, 0.0), 1e12
    return max(my - slope * mx, 0.0), 1 / slope


def fit_all(model: ModelSpec, data: dict[str, Any]) -> dict[str, Any]:
    """The calibration file's content from ``measure``'s data (no server needed)."""
    start = CostParams("calibrated", flops=1e11, hbm_bw=1e10, memory=1e9, nvlink_bw=1e9,
                       mfu=1.0, mfu_attn=1.0, mbu=1.0, layer_overhead_s=0.0,
                       step_overhead_s=0.005, allreduce_latency_s=1e-4,
                       request_overhead_s=0.01,
                       first_token_lag_steps=first_token_lag_steps(data.get("serving")),
                       host_cores=host_cores(data.get("serving")))
    fixed, bw = fit_transforms(data["transforms"])
    start = start.with_(transform_fixed_s=fixed, nvlink_bw=bw)
    # the all-reduce floor's growth with the degree is a choice, not a fitted number: keep
    # the scaling whose best fit has the lower loss (ties: flat)
    fits = {scaling: fit(model, start.with_(allreduce_scaling=scaling), data["steps"])
            for scaling in ALLREDUCE_SCALINGS}
    losses = {scaling: sum(math.log1p(e) ** 2 for e in errs)
              for scaling, (_, errs) in fits.items()}
    params, errors = fits[min(ALLREDUCE_SCALINGS, key=lambda sc: losses[sc])]
    # The measured server's replica holds a configured number of KV slots: every plan holds
    # k x that (kv_tokens_tp1); memory is also set so the Gyges plan reproduces it.
    plan = MemoryPlan(model, params, int(data["max_tp"]))
    weights = model.weight_bytes - model.mlp_bytes + plan.padded_mlp_bytes
    kv = (data["capacity_tokens_tp1"] + 0.5) * model.kv_bytes_per_token
    params = params.with_(memory=(kv + weights) / params.mem_fraction,
                          kv_tokens_tp1=int(data["capacity_tokens_tp1"]))
    for pt, err in zip(data["steps"], errors, strict=True):
        pt["fit_rel_err"] = round(err, 4)
    return {"params": params.to_json(), "model": model.name, "measurements": data,
            "fit": {"mean_abs_rel_err": round(sum(map(abs, errors)) / len(errors), 4),
                    "max_abs_rel_err": round(max(map(abs, errors)), 4),
                    # each scaling's best mean absolute relative error
                    "allreduce_scaling_mean_abs_rel_err": {
                        sc: round(sum(map(abs, errs)) / len(errs), 4)
                        for sc, (_, errs) in fits.items()}}}


def calibrate(args: argparse.Namespace) -> dict[str, Any]:
    """Measure the server at ``--url`` (or refit ``--measurements``) and write ``--out``."""
    if args.measurements:
        try:
            old = json.loads(Path(args.measurements).read_text())
            data = old["measurements"]
        except (OSError, ValueError, KeyError) as e:
            raise SimInputError(f"cannot read measurements {args.measurements}: {e}") from None
        path = args.model_path
        if not path:
            raise SimInputError("--measurements needs --model-path")
        model = model_from_hf(path)
        url = old.get("url", "")
    else:
        if not args.url:
            raise SimInputError("calibrate needs --url (or --measurements)")
        srv = Server(args.url, args.api_key)
        path = args.model_path or srv.call("/get_model_info").get("model_path")
        model = model_from_hf(path)
        data = measure(srv, model, max(1, args.repeats))
        data["serving"]["host_cores"] = len(os.sched_getaffinity(0))
        url = args.url
    if getattr(args, "host_cores", None) is not None:
        if args.host_cores <= 0:
            raise SimInputError("--host-cores must be > 0")
        data.setdefault("serving", {"device": "cpu", "overlap_schedule": True})
        data["serving"]["host_cores"] = args.host_cores
    out = fit_all(model, data)
    out["url"] = url
    try:
        Path(args.out).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    except OSError as e:
        raise SimInputError(f"cannot write {args.out}: {e.strerror or e}") from None
    p = out["params"]
    print(f"calibrated {model.name}: mean |error| {out['fit']['mean_abs_rel_err']:.1%} over "
          f"{len(data['steps'])} step measurements; transformation fixed "
          f"{p['transform_fixed_s'] * 1000:.0f} ms, {p['nvlink_bw'] / 1e9:.3f} GB/s")
    return out
