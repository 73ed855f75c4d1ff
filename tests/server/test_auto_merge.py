"""Automatic transformations on a dp 2 server whose replicas hold 1024 KV slots each
(tiny Llama, float32 CPU, split hold-down 2 s):

- a request too long for one replica merges the group by itself (live: short requests
  keep running), is served with stock SGLang's output (one replica configured with 8192
  slots), and the group splits back after the hold-down;
- a long request held for its merge can be aborted;
- on the merged instance a long request retracts short running requests that hold the
  merged pool instead of waiting for them to finish.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from gyges.testing.clients import generate_ids, start_streams, wait_until_streaming
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA

HOLD_DOWN_S = 2.0
LONG = [[(7 * i + 13 * j) % 300 + 5 for j in range(n)] for i, n in enumerate((1500, 1900))]
SHORT = [[5, 9, 11, 40], [(3 * j) % 200 + 7 for j in range(30)]]
NEW_TOKENS = 16
# The session request that holds the merge: as long as one replica allows (3 + 1000 of its
# 1016 usable slots), about 5 s of ~5 ms decode steps here.
BLOCKER_TOKENS = 1000
# One short stream per replica, 60 + 950 of its 1016 usable slots; then a request of
# 1500 + 8 that only the merged pool (2032 usable) holds, while the short ones hold most of it.
PREEMPT_SHORT = [[(11 * i + 5 * j) % 250 + 3 for j in range(60)] for i in range(2)]
PREEMPT_SHORT_TOKENS = 950
PREEMPT_LONG = [(5 * j) % 280 + 9 for j in range(1500)]


def status(url: str) -> dict:
    return requests.get(url + "/gyges/status", timeout=30).json()


def layout(url: str) -> list[list[int]]:
    return [i["ranks"] for i in status(url)["instances"]]


@pytest.fixture(scope="module")
def reference():
    """Stock SGLang, one replica large enough for every prompt here."""
    with SGLangServer(tiny_model(LLAMA_GQA), dp_size=1, max_total_tokens=8192) as srv:
        return {"long": [generate_ids(srv.url, x, NEW_TOKENS) for x in LONG],
                "short": [generate_ids(srv.url, x, NEW_TOKENS) for x in SHORT],
                "preempt_short": [generate_ids(srv.url, x, PREEMPT_SHORT_TOKENS)
                                  for x in PREEMPT_SHORT],
                "preempt_long": generate_ids(srv.url, PREEMPT_LONG, NEW_TOKENS)}


@pytest.fixture(scope="module")
def srv(reference):
    with SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True, max_total_tokens=1024,
                      extra_args=["--gyges-split-hold-down", str(HOLD_DOWN_S)]) as s:
        yield s


def wait_for_split(url: str) -> None:
    deadline = time.monotonic() + HOLD_DOWN_S + 60
    while layout(url) != [[0], [1]]:
        assert time.monotonic() < deadline, status(url)["scheduler"]
        time.sleep(0.5)


def post_generate(url: str, body: dict) -> dict:
    return requests.post(url + "/generate", json=body, timeout=300).json()


def test_abort_of_a_request_held_for_a_merge(srv):
    """A long request waits while its group cannot merge (a running request of a session,
    whose state does not move; /gyges/status says so); aborting it answers the client once
    the merge is done, without serving it."""
    r = requests.post(srv.url + "/open_session", json={"capacity_of_str_len": 4096},
                      timeout=30)
    assert r.status_code == 200, r.text
    sid = r.json()
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(post_generate, srv.url, {
            "input_ids": [7, 8, 9], "session_params": {"id": sid}, "sampling_params": {
                "max_new_tokens": BLOCKER_TOKENS, "ignore_eos": True,
                "frequency_penalty": 0.1}})
        wait_until_streaming(srv.url, 1)
        # 900 prompt + 300 new > one replica's 1016 usable slots: it needs TP2.
        held = pool.submit(post_generate, srv.url, {
            "rid": "gyges-held-long", "input_ids": [11] * 900,
            "sampling_params": {"max_new_tokens": 300, "ignore_eos": True}})
        deadline = time.monotonic() + 30
        while not status(srv.url)["scheduler"]["pending"]:
            assert time.monotonic() < deadline and not held.done()
            time.sleep(0.1)
        st = status(srv.url)["scheduler"]
        assert st["reserved"][0]["ranks"] == [0, 1] and st["reserved"][0]["for"] == \
            "gyges-held-long"
        held_by: dict = {}
        while not held_by:  # what holds the merge, with the request and why
            assert time.monotonic() < deadline + 30 and not held.done()
            held_by = (status(srv.url)["transformation"] or {}).get("held_by") or {}
            time.sleep(0.1)
        assert any("session" in why for why in held_by.values()), held_by
        r = requests.post(srv.url + "/abort_request", json={"rid": "gyges-held-long"},
                          timeout=30)
        assert r.status_code == 200
        out = held.result(timeout=120)
        assert out["meta_info"]["finish_reason"]["type"] == "abort", out
        assert out["meta_info"]["completion_tokens"] == 0, (out["meta_info"], blocker.done())
        assert blocker.result(timeout=120)["meta_info"]["completion_tokens"] == BLOCKER_TOKENS
    requests.post(srv.url + "/close_session", json={"session_id": sid}, timeout=30)
    st = status(srv.url)["scheduler"]
    assert st["pending"] == [] and st["reserved"] == []
    assert any(d["decision"] == "aborted" for d in st["decisions"])
    wait_for_split(srv.url)


def test_long_request_merges_by_itself_matches_stock_and_splits_back(srv, reference):
    wait_for_split(srv.url)
    with ThreadPoolExecutor(3) as pool:  # short requests sent while the merge is pending
        long_out = pool.submit(generate_ids, srv.url, LONG[0], NEW_TOKENS)
        time.sleep(0.3)
        short_out = [pool.submit(generate_ids, srv.url, x, NEW_TOKENS) for x in SHORT]
        assert long_out.result() == reference["long"][0]
        assert [f.result() for f in short_out] == reference["short"]
    assert generate_ids(srv.url, LONG[1], NEW_TOKENS) == reference["long"][1]
    st = status(srv.url)
    kinds = [d["decision"] for d in st["scheduler"]["decisions"]]
    assert "merge" in kinds and st["scheduler"]["counters"]["auto_merges"]["done"] >= 1
    long_dispatches = [d for d in st["scheduler"]["decisions"]
                       if d["decision"] == "dispatch" and d["degree"] == 2]
    assert len(long_dispatches) == 2 and all(d["tp"] == 2 for d in long_dispatches)
    wait_for_split(srv.url)
    st = status(srv.url)["scheduler"]
    assert st["counters"]["auto_splits"]["done"] >= 1 and st["auto_merged"] == []
    assert [generate_ids(srv.url, x, NEW_TOKENS) for x in SHORT] == reference["short"]



def test_a_long_request_retracts_short_ones_on_its_merged_instance(srv, reference):
    """Two short streams (one pinned to each replica) hold most of the merged pool when a
    request only TP2 can hold arrives. It merges the group and is admitted at once: the
    merged instance retracts just enough short streams (SGLang's retraction: recomputed when
    admitted again) instead of making it wait until they finish. Without that it finishes
    after them. Every output equals stock SGLang's."""
    wait_for_split(srv.url)
    merges: list[dict] = []
    stop = threading.Event()

    def watch() -> None:  # the merge's reply, before the hold-down splits the group
        while not stop.is_set():
            last = status(srv.url).get("last_transformation") or {}
            if last.get("op") == "merge" and last not in merges:
                merges.append(last)
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threads, got = start_streams(srv.url, PREEMPT_SHORT, PREEMPT_SHORT_TOKENS, min_chunks=5,
                                 extras=[{"routed_dp_rank": i} for i in range(2)])
    try:
        out = generate_ids(srv.url, PREEMPT_LONG, NEW_TOKENS)
        finished_first = [i for i, t in enumerate(threads) if not t.is_alive()]
    finally:
        for t in threads:
            t.join(timeout=300)
        stop.set()
        watcher.join(timeout=30)
    assert out == reference["preempt_long"]
    assert finished_first == [], "the long request waited for short streams to finish"
    assert [got[i][-1]["output_ids"] for i in range(2)] == reference["preempt_short"]
    assert merges and merges[-1]["requests_moved"]["running"] == 2, merges
    wait_for_split(srv.url)
    split = status(srv.url)["last_transformation"]
    assert split["op"] == "split" and split["retracted_for_long"] >= 1, split
