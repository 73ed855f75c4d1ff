"""The ranks of a merged instance schedule the same batches, whatever their replicas did.

SGLang's TP ranks each run their own scheduler and stay in step only because they decide
from the same state. Members that were replicas arrive with their own: here SGLang's
new-token ratio, which budgets prefill admission by the running requests' expected
tokens. A replica that decoded for a while has decayed it (to 0.098 here); an idle one
holds 0.7. Before the members agreed on it, the merged ranks disagreed on whether a
request fitted: one prefilled it, the other decoded, and the next all-reduce mismatched
(gloo "76800 vs 256" in ``benchmark/blocked_merge.py --priority``: the host went down)."""
from __future__ import annotations

import threading
import time

import requests

from gyges.testing.clients import generate_ids, stream_generate
from gyges.testing.server import SGLangServer, tiny_model

SLOTS = 1024  # per replica; the merged instance holds 2048
STREAM = [(7 * j) % 500 + 5 for j in range(40)]
STREAM_NEW = 700
# Fits the merged pool by what a decayed ratio reserves for the stream (650 x 0.098 = 64
# tokens) and not by what 0.7 reserves (455): 2048 - the stream's ~40 + d tokens -
# 0.098 x (700 - d) >= 1600 > 2048 - (40 + d) - 0.7 x (700 - d), for as long as the
# stream has decoded d <= ~376 tokens. The long request arrives after the merge returns, so
# the merge must return by WINDOW tokens (the stream decodes while the KV is pre-copied).
LONG = [(11 * j) % 600 + 7 for j in range(900)]
LONG_NEW = 700
WINDOW = 300


def _stream(url: str, ids: list[int], new: int, out: list, **extra) -> threading.Thread:
    """The stream's EOS masked until ``new`` tokens (``min_new_tokens``) with ``ignore_eos``
    off: SGLang reserves ``ratio x`` the remaining tokens only for such requests."""
    sampling = {"ignore_eos": False, "min_new_tokens": new}
    t = threading.Thread(target=stream_generate, args=(url, ids, new),
                         kwargs={"chunks": out,
                                 "extra": {"sampling_params": sampling, **extra}})
    t.start()
    return t


def test_merged_ranks_agree_on_admission_after_replicas_diverged():
    srv = SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=SLOTS,
                       extra_args=("--gyges-split-hold-down", "600"))
    srv.env["SGLANG_NEW_TOKEN_RATIO_DECAY_STEPS"] = "20"  # decayed to its floor in 20 steps
    with srv:
        want: list[dict] = []
        _stream(srv.url, STREAM, STREAM_NEW, want, routed_dp_rank=0).join(timeout=300)
        assert len(want[-1]["output_ids"]) == STREAM_NEW

        history = []
        for _ in range(3):  # a slow machine may let the stream run past WINDOW in a merge
            got: list[dict] = []
            t = _stream(srv.url, STREAM, STREAM_NEW, got, routed_dp_rank=0)
            while len(got) < 30 and t.is_alive():  # replica 0's ratio at its floor; 1 idle
                t.join(timeout=0.05)
            r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
            assert r.status_code == 200, r.text
            moved = r.json()["requests_moved"]["running"]
            if moved == 1 and len(got) < WINDOW:
                break
            history.append({"moved": moved, "decoded": len(got),
                            "elapsed_ms": r.json().get("elapsed_ms")})
            t.join(timeout=300)
            r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
            assert r.status_code == 200, r.text
        else:
            raise AssertionError(f"no merge met the stream within {WINDOW} tokens: {history}")

        long_out: list[dict] = []
        lt = _stream(srv.url, LONG, LONG_NEW, long_out, routed_dp_rank=0)
        t.join(timeout=300)
        lt.join(timeout=300)
        assert not t.is_alive() and not lt.is_alive(), "a stream did not return"
        assert got[-1]["output_ids"] == want[-1]["output_ids"]
        first = long_out[-1]["output_ids"]
        assert len(first) == LONG_NEW, long_out[-1]["meta_info"]
        assert requests.get(srv.url + "/health", timeout=10).status_code == 200

        again: list[dict] = []  # the same request alone on the merged instance
        _stream(srv.url, LONG, LONG_NEW, again, routed_dp_rank=0).join(timeout=300)
        assert again[-1]["output_ids"] == first


TIMEOUT_PROMPTS = [[(3 * i + j) % 300 + 5 for j in range(400)] for i in range(4)]
TIMEOUT_NEW = 700  # 400 + 700 fits one 1200-slot replica; two such do not (one waits)


def test_sglang_request_timeouts_abort_alike_on_a_merged_instance():
    """SGLang's ``SGLANG_REQ_WAITING_TIMEOUT`` / ``SGLANG_REQ_RUNNING_TIMEOUT`` are decided
    by each process's clock: TP rank 0 decides and broadcasts the aborts, or the ranks drop
    different requests and the next collective mismatches. Requests moved into a merged
    instance (running and waiting) time out there; every rank drops them together, the host
    stays up, and what each stream got before its abort equals stock."""
    with SGLangServer(tiny_model(), dp_size=1, gyges=False) as stock:
        want = [generate_ids(stock.url, p, TIMEOUT_NEW) for p in TIMEOUT_PROMPTS]
    srv = SGLangServer(tiny_model(), dp_size=2, gyges=True, max_total_tokens=1200,
                       extra_args=("--gyges-policy", "round_robin",
                                   "--gyges-split-hold-down", "600"))
    srv.env["SGLANG_REQ_RUNNING_TIMEOUT"] = "3"
    srv.env["SGLANG_REQ_WAITING_TIMEOUT"] = "3"
    with srv:
        got: dict[int, list[dict]] = {i: [] for i in range(len(TIMEOUT_PROMPTS))}
        threads = []
        for i, p in enumerate(TIMEOUT_PROMPTS):  # in order: round robin, 2 per replica
            threads.append(threading.Thread(target=stream_generate, args=(srv.url, p, TIMEOUT_NEW),
                                            kwargs={"chunks": got[i]}))
            threads[-1].start()
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while True:  # one runs and one waits on each replica
            inst = requests.get(srv.url + "/gyges/status", timeout=30).json()["instances"]
            if sum(x["running"] for x in inst) >= 2 and sum(x["waiting"] for x in inst) >= 2:
                break
            assert time.monotonic() < deadline, inst
            time.sleep(0.05)
        r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        moved = r.json()["requests_moved"]
        assert moved["running"] >= 1 and moved["waiting"] >= 1, moved
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a stream did not return"
        reasons = [c[-1]["meta_info"]["finish_reason"] for c in got.values()]
        timed_out = [f for f in reasons if f["type"] == "abort"]
        assert timed_out, f"no timeout fired on the merged instance: {reasons}"
        for f in timed_out:
            assert f["status_code"] == 503 and "timeout reached" in f["message"], f
        for i, chunks in got.items():
            out = chunks[-1]["output_ids"]
            assert out == want[i][:len(out)], i
        assert requests.get(srv.url + "/health", timeout=30).status_code == 200
        r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
