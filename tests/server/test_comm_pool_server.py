"""Communicator pool and controller -> scheduler commands in a real dp 4 server on CPU."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import requests

from gyges.comm.pool import expected_sum
from gyges.testing.clients import generate_ids, greedy_outputs
from gyges.testing.server import SGLangServer, tiny_model

logger = logging.getLogger(__name__)
# A wide MLP (12 MiB of float32 weights per layer) so released shards show in resident memory
MODEL = dict(arch="llama", heads=4, kv_heads=4, intermediate=8192)


def wait_for_pool(url: str, num_ranks: int, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = requests.get(url + "/gyges/status", timeout=10).json()
        if st["comm_pool"]["ready_ranks"] == list(range(num_ranks)):
            return st
        time.sleep(0.5)
    raise TimeoutError(f"communicator pool not ready: {st['comm_pool']}")


@pytest.fixture(scope="module")
def dp4():
    t0 = time.monotonic()
    # 16384 slots: two 3000-token streams per replica (the hierarchical test) fit at once
    with SGLangServer(tiny_model(**MODEL), dp_size=4, gyges=True, startup_timeout_s=420,
                      max_total_tokens=16384,
                      # 4 ranks load at once on a shared box: leave headroom in the
                      # memory profiling (the pool is capped by --max-total-tokens)
                      extra_args=["--gyges-max-tp", "4", "--mem-fraction-static", "0.25"]
                      ) as srv:
        srv.healthy_s = time.monotonic() - t0
        srv.pool_status = wait_for_pool(srv.url, 4)
        srv.pool_ready_s = time.monotonic() - t0
        yield srv


@pytest.fixture(scope="module")
def baseline(dp4):
    """Greedy outputs before any command ran."""
    return greedy_outputs(dp4.url)


def comm_check(url: str, body: object) -> requests.Response:
    return requests.post(url + "/gyges/debug/comm_check", json=body, timeout=90)


def test_pool_startup_overhead(dp4, baseline):
    pool = dp4.pool_status["comm_pool"]
    build_ms = {int(r): ms for r, ms in pool["build_ms"].items()}
    assert sorted(build_ms) == [0, 1, 2, 3]
    msg = (f"dp4 max_tp 4: healthy after {dp4.healthy_s:.1f}s, pool ready on every rank "
           f"after {dp4.pool_ready_s:.1f}s; per-rank pool build+verify ms {build_ms}")
    logger.warning(msg)
    print(msg)
    assert max(build_ms.values()) < 30_000


@pytest.mark.parametrize("ranks", [[0, 1], [2, 3], [0, 1, 2, 3], [3, 2]])
def test_comm_check_sums_on_every_rank(dp4, baseline, ranks):
    r = comm_check(dp4.url, {"ranks": ranks})
    assert r.status_code == 200, r.text
    out = r.json()
    group = sorted(ranks)
    assert out["ranks"] == group and out["passed"]
    assert out["expected"] == expected_sum(tuple(group))
    assert [x["rank"] for x in out["results"]] == group
    for x in out["results"]:
        assert x["ok"] and x["result"] == expected_sum(tuple(group))
        assert 0 <= x["elapsed_ms"] < 10_000


@pytest.mark.parametrize("body, message", [
    ({"ranks": [1, 2]}, "not an aligned group"),
    ({"ranks": [0]}, "at least 2 ranks"),
    ({"ranks": [0, 9]}, "unknown rank(s) [9]"),
    ({"ranks": [0, 1, 2]}, "a group of 3 ranks is not allowed"),
    ({"ranks": "0,1"}, "must be a list of integers"),
    ({"ranks": [0, 0]}, "duplicates"),
    ({"group": [0, 1]}, "must be a JSON object"),
    ([0, 1], "must be a JSON object"),
])
def test_bad_groups_get_400(dp4, baseline, body, message):
    r = comm_check(dp4.url, body)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_malformed_json_gets_400(dp4, baseline):
    r = requests.post(dp4.url + "/gyges/debug/comm_check", data=b"{ranks: [0,", timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]


def test_requests_are_served_while_commands_run(dp4, baseline):
    errors: list[BaseException] = []
    outputs: list[list[int]] = []

    def client(i: int) -> None:
        try:
            outputs.append(generate_ids(dp4.url, [5 + i, 9, 11, 40 + i], max_new_tokens=24))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    checks = [comm_check(dp4.url, {"ranks": g}) for g in ([0, 1], [2, 3], [0, 1, 2, 3]) * 2]
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(outputs) == 8 and all(len(o) == 24 for o in outputs)
    assert all(c.status_code == 200 and c.json()["passed"] for c in checks)


def test_outputs_unchanged_after_commands(dp4, baseline):
    assert greedy_outputs(dp4.url) == baseline
    assert requests.get(dp4.url + "/health", timeout=30).status_code == 200


def _transform(url: str, op: str, ranks: list[int]) -> dict:
    r = requests.post(f"{url}/gyges/{op}", json={"ranks": ranks}, timeout=300)
    assert r.status_code == 200, f"{op} {ranks}: {r.text}"
    return r.json()


def _topology(url: str) -> list[list[int]]:
    return [i["ranks"] for i in requests.get(url + "/gyges/status", timeout=30).json()
            ["instances"]]


def test_hierarchical_merge_and_split_with_requests_in_flight(dp4, baseline):
    """TP1 x4 -> TP2 x2 -> TP4 -> TP2 x2 -> TP1 x4 while eight streams run: every step
    moves running requests, every output equals the untransformed one, nothing is
    retracted, the status shows each topology. The streams ask for ten times the
    reference's tokens, so none ends before the last step however fast the machine, and
    are aborted once past it; their first ``NEW`` tokens are compared (a greedy output of
    a longer request begins with the shorter one's)."""
    from gyges.testing.clients import abort_once_past, start_streams, stream_generate

    new = 300
    prompts = [[(11 * i + 7 * j) % 500 + 3 for j in range(n)]
               for i, n in enumerate((5, 17, 30, 8, 12, 41, 3, 22))]
    ref = [stream_generate(dp4.url, p, new)[-1]["output_ids"] for p in prompts]
    threads, got = start_streams(dp4.url, prompts, 10 * new)
    steps = [("merge", [0, 1], [[0, 1], [2], [3]]), ("merge", [2, 3], [[0, 1], [2, 3]]),
             ("merge", [0, 1, 2, 3], [[0, 1, 2, 3]]), ("split", [0, 1, 2, 3], [[0, 1], [2, 3]]),
             ("split", [0, 1], [[0], [1], [2, 3]]), ("split", [2, 3], [[0], [1], [2], [3]])]
    moved = []
    for op, ranks, topology in steps:
        out = _transform(dp4.url, op, ranks)
        moved.append(out["requests_moved"]["running"])
        assert _topology(dp4.url) == topology
    assert all(t.is_alive() for t in threads), "a stream ended before the last step"
    finals = abort_once_past(dp4.url, threads, got, new)
    # every stream is on some instance of every step's group (two per replica by load)
    assert all(m >= 2 for m in moved), moved
    for i, (r, final) in enumerate(zip(ref, finals, strict=True)):
        assert final["output_ids"][:new] == r, f"request {i} diverged"
        assert final["meta_info"]["num_retractions"] == 0
    assert greedy_outputs(dp4.url) == baseline


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def test_merge_releases_mlp_shards_and_split_restores_them(dp4, baseline):
    """Resident memory of each member drops by about the released shard bytes on a merge to
    TP2 (and further on TP4) and comes back on the split; outputs stay the same."""
    st = requests.get(dp4.url + "/gyges/status", timeout=30).json()
    pids = {p["rank"]: p["pid"] for p in st["processes"]["schedulers"]}
    before = {r: _rss(pids[r]) for r in (0, 1)}
    out = _transform(dp4.url, "merge", [0, 1])
    released = {int(r): m["weight_bytes_released"] for r, m in out["members"].items()}
    assert all(b >= 12 << 20 for b in released.values()), released  # half of 24 MiB
    after = {r: _rss(pids[r]) for r in (0, 1)}
    for r in (0, 1):
        drop = before[r] - after[r]
        # glibc raises its mmap threshold as large blocks are freed, so part of the freed
        # shards can stay in its heap (a fresh-clone CI saw 0.696 on 2026-12-06)
        assert drop >= 0.5 * released[r], (r, drop, released[r])
    assert out["weight_bytes_released"] == sum(released.values())
    assert greedy_outputs(dp4.url)["ids"] == baseline["ids"]
    out = _transform(dp4.url, "split", [0, 1])
    restored = {int(r): m["weight_bytes_restored"] for r, m in out["members"].items()}
    assert restored == released or all(v > 0 for v in restored.values()), restored
    back = {r: _rss(pids[r]) for r in (0, 1)}
    for r in (0, 1):
        assert back[r] - after[r] >= 0.5 * restored[r], (r, back[r] - after[r], restored[r])
    assert greedy_outputs(dp4.url) == baseline
