"""Stress, bounded and on loopback: 200 requests, mostly short, some needing TP2 and some
TP4, sent concurrently to a dp 4 Gyges server whose replicas hold 512 KV slots each. Every
request completes exactly once with stock SGLang's greedy output (one replica with 4096
slots), nothing hangs, and the number of automatic merges stays bounded."""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gyges.testing.server import SGLangServer, tiny_model

MODEL = dict(arch="llama", heads=4, kv_heads=4)  # 4 KV heads: max TP 4
RANK_TOKENS = 512  # usable 504; TP2 1008; TP4 2016
NEW_TOKENS = 4
HOLD_DOWN_S = 3.0


def workload() -> list[list[int]]:
    rng = random.Random(5)
    lengths = ([rng.randint(4, 60) for _ in range(180)] + [rng.randint(520, 980) for _ in range(12)]
               + [rng.randint(1020, 1990) for _ in range(8)])
    rng.shuffle(lengths)
    return [[rng.randrange(5, 1000) for _ in range(n)] for n in lengths]


def generate(url: str, ids: list[int], timeout_s: float = 600) -> tuple[int, list[int]]:
    r = requests.post(url + "/generate", timeout=timeout_s, json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": NEW_TOKENS,
                                              "ignore_eos": True}})
    return r.status_code, r.json().get("output_ids", []) if r.ok else [r.text]


def _generate_or_timeout(url: str, ids: list[int]) -> tuple[int, list]:
    try:
        return generate(url, ids, timeout_s=240)
    except requests.Timeout:
        return 0, ["no answer within 240 s"]


def _state(url: str) -> dict:
    """What the host's scheduler and instances show now (for a failure message)."""
    st = requests.get(url + "/gyges/status", timeout=30).json()
    sch = st.get("scheduler", {})
    return {"instances": st.get("instances"), "pending": sch.get("pending"),
            "reserved": sch.get("reserved"), "job": sch.get("job"),
            "decisions": sch.get("decisions", [])[-10:],
            "transformation": st.get("transformation")}


@pytest.fixture(scope="module")
def prompts():
    return workload()


@pytest.fixture(scope="module")
def reference(prompts):
    with SGLangServer(tiny_model(**MODEL), dp_size=1, max_total_tokens=4096) as srv:
        return [generate(srv.url, p)[1] for p in prompts]


@pytest.fixture(scope="module")
def dp4(reference):
    with SGLangServer(tiny_model(**MODEL), dp_size=4, gyges=True, max_total_tokens=RANK_TOKENS,
                      startup_timeout_s=420,
                      extra_args=["--gyges-max-tp", "4", "--mem-fraction-static", "0.25",
                                  "--gyges-split-hold-down", str(HOLD_DOWN_S)]) as srv:
        yield srv


def test_concurrent_mix_matches_stock_with_bounded_merges(dp4, prompts, reference):
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: _generate_or_timeout(dp4.url, p), prompts))
    elapsed = time.monotonic() - t0
    codes = [c for c, _ in results]
    # A request that gets no answer within 240 s fails the test with the host's state and
    # every scheduler's own report of a queue it stopped admitting (switch/stall_watch).
    stalls = [line for line in dp4.log_path.read_text(errors="replace").splitlines()
              if "admitted none" in line]
    assert codes == [200] * len(prompts), (
        [r for r in results if r[0] != 200][:3], _state(dp4.url), stalls[-4:])
    assert not stalls, stalls[-4:]  # nothing running, a queue not moving: never right
    wrong = [i for i, ((_, out), ref) in enumerate(zip(results, reference, strict=True))
             if out != ref]
    assert not wrong, f"{len(wrong)} outputs differ from stock, e.g. prompt {wrong[0]}"
    st = requests.get(dp4.url + "/gyges/status", timeout=30).json()["scheduler"]
    counts = st["counters"]
    print(f"200 requests in {elapsed:.1f}s; decisions {counts['decisions']}; "
          f"merges {counts['auto_merges']}; splits {counts['auto_splits']}")
    assert st["pending"] == [] and st["reserved"] == []
    long_requests = sum(len(p) + NEW_TOKENS > RANK_TOKENS - 8 for p in prompts)
    assert 1 <= counts["auto_merges"].get("done", 0) <= 3 * long_requests
    assert counts["auto_merges"].get("failed", 0) == 0
    assert counts["decisions"].get("fallback", 0) == 0
    # Every request was dispatched exactly once (decisions of the last 50 aside).
    assert counts["decisions"]["dispatch"] == len(prompts)
    deadline = time.monotonic() + 4 * HOLD_DOWN_S + 120
    while [i["tp"] for i in requests.get(dp4.url + "/gyges/status",
                                          timeout=30).json()["instances"]] != [1] * 4:
        assert time.monotonic() < deadline, "merged instances did not split back"
        time.sleep(1.0)
