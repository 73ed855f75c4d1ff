"""The router in front of two real Gyges servers (dp 2 each, tiny model, CPU, float32).

One module-scoped pair of servers and one router process serve every test; the last two tests
take the second server down (a failed merge, then SIGKILL), so the order of the tests in this
file matters.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests

from gyges.testing.clients import stream_generate
from gyges.testing.server import SGLangServer, free_port, tiny_model

pytestmark = [pytest.mark.server, pytest.mark.timeout(900)]

RANK_TOKENS = 1024  # --max-total-tokens: one TP1 replica's KV capacity
PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"
FAULT_FILE = Path(tempfile.gettempdir()) / f"gyges-router-e2e-fault-{os.getpid()}"
WORDS = "the model token cache merge split group rank serve request long short prompt".split()


def prompt(i: int, words: int = 12) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def short_body(i: int) -> dict[str, object]:
    params = {"max_new_tokens": 8, "temperature": 0}
    return {"text": prompt(i), "sampling_params": params}


def long_body(i: int, tokens: int) -> dict[str, object]:
    rng = random.Random(1000 + i)
    ids = [rng.randrange(300, 1000) for _ in range(tokens)]
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}


def generate(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    resp = requests.post(url + "/generate", json=body, timeout=300)
    return resp.status_code, resp.json()


class RouterProcess:
    """`python -m gyges.router` in its own process group."""

    def __init__(self, worker_urls: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        path = f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        env = dict(os.environ, PYTHONPATH=path)
        self.log = tempfile.NamedTemporaryFile(prefix="gyges-router-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gyges.router", "--worker-urls", *worker_urls,
             "--host", "127.0.0.1", "--port", str(self.port), "--policy", "gyges",
             "--health-check-interval-secs", "1", "--status-interval-secs", "0.25"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                workers = requests.get(self.url + "/workers", timeout=5).json()
                if workers["stats"]["healthy_count"] == len(worker_urls):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"router did not report all workers healthy; log {self.log.name}")

    def status(self) -> dict[str, object]:
        return requests.get(self.url + "/gyges/status", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.log.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[list[SGLangServer]]:
    model = tiny_model()
    # A long hold-down: a host must not split back between the long requests of one test
    # (the router's placement after a split is unit-tested).
    pair = [SGLangServer(model, dp_size=2, gyges=True, max_total_tokens=RANK_TOKENS,
                         extra_args=["--gyges-split-hold-down", "60"])
            for _ in range(2)]  # fmt: skip
    # the second server's faults are armed by writing FAULT_FILE (see test_host_failing...)
    FAULT_FILE.unlink(missing_ok=True)
    pair[1].env.update(GYGES_FAULT_INJECT=f"@{FAULT_FILE}", GYGES_EXIT_GRACE_S="3")
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(SGLangServer.start, pair))
        yield pair
    finally:
        for srv in pair:
            srv.stop()
        FAULT_FILE.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def router(servers: list[SGLangServer]) -> Iterator[RouterProcess]:
    proc = RouterProcess([s.url for s in servers])
    try:
        yield proc
    finally:
        proc.stop()


def long_tokens(router: RouterProcess) -> int:
    """A prompt length that is long for the hosts (> one replica) yet accepted by them."""
    status = router.status()
    hosts = [w["status"] for w in status["workers"]]
    cap = max(i["capacity_tokens"] // i["tp"] for h in hosts for i in h["instances"])
    limit = min(h["max_request_tokens"] for h in hosts)
    assert limit > cap + 64, f"servers take no request above one replica ({cap} tokens)"
    return (cap + limit) // 2


def auto_merges(url: str) -> int:
    status = requests.get(url + "/gyges/status", timeout=30).json()
    return status["scheduler"]["counters"]["auto_merges"].get("done", 0)


def by_url(status: dict[str, object]) -> dict[str, dict[str, object]]:
    return {w["url"]: w for w in status["workers"]}


def test_short_requests_match_direct_and_spread(servers, router):
    bodies = [short_body(i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        routed = list(pool.map(lambda b: generate(router.url, b), bodies))
    direct = [generate(servers[0].url, b) for b in bodies]
    assert [s for s, _ in routed] == [200] * len(bodies)
    assert [r["text"] for _, r in routed] == [d["text"] for _, d in direct]
    status = by_url(router.status())
    assert all(status[s.url]["routed_short"] > 0 for s in servers)
    assert all(status[s.url]["gyges"] for s in servers)


def test_long_requests_merge_where_placed_while_shorts_flow(servers, router):
    """Load first (router/policy.py): long requests go to the least-loaded host, so they may
    land on either; each host that took one merged for it, the others did not transform, and
    short requests kept flowing to both."""
    n = long_tokens(router)
    before = by_url(router.status())
    merges_before = {u: auto_merges(u) for u in before}
    longs = [long_body(i, n) for i in range(3)]
    shorts = [short_body(100 + i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        short_futs = [pool.submit(generate, router.url, b) for b in shorts]
        long_out = [generate(router.url, b) for b in longs]  # one after another
        short_out = [f.result() for f in short_futs]
    after = by_url(router.status())
    merged = {u: auto_merges(u) - merges_before[u] for u in after}  # before direct requests
    assert [s for s, _ in long_out + short_out] == [200] * (len(longs) + len(shorts))
    direct = [generate(servers[0].url, b)[1]["text"] for b in longs + shorts]
    assert [r["text"] for _, r in long_out + short_out] == direct
    delta = {u: {k: after[u][k] - before[u][k] for k in ("routed_long", "routed_short")}
             for u in after}  # fmt: skip
    placements = [x for x in Path(router.log.name).read_text().splitlines() if "long request" in x]
    assert sum(d["routed_long"] for d in delta.values()) == len(longs), (delta, placements)
    for u, d in delta.items():
        assert (merged[u] >= 1) == (d["routed_long"] > 0), (merged, delta, placements)
    assert sum(d["routed_short"] for d in delta.values()) >= len(shorts), delta


def test_openai_client_streams_through_router(servers, router):
    client = openai.OpenAI(base_url=router.url + "/v1", api_key="none", max_retries=0)
    direct = openai.OpenAI(base_url=servers[0].url + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": prompt(7)}]
    args = {"model": model, "max_tokens": 10, "temperature": 0}
    chunks = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(messages=messages, stream=True, **args)
              if c.choices]  # fmt: skip
    want = direct.chat.completions.create(messages=messages, **args).choices[0].message.content
    assert len(chunks) > 2 and "".join(chunks) == want
    pieces = [c.choices[0].text for c in
              client.completions.create(prompt=prompt(8), stream=True, **args)]  # fmt: skip
    assert "".join(pieces) == direct.completions.create(prompt=prompt(8), **args).choices[0].text


def test_bad_input_and_server_errors_pass_through(servers, router):
    assert requests.get(router.url + "/nope", timeout=10).status_code == 404
    resp = requests.post(router.url + "/generate", data=b"{oops", timeout=10)
    assert resp.status_code == 400 and "malformed JSON" in resp.json()["error"]["message"]
    too_long = {"input_ids": [5] * (8 * RANK_TOKENS), "sampling_params": {"max_new_tokens": 4}}
    status, _ = generate(router.url, too_long)
    assert status == generate(servers[0].url, too_long)[0] == 400
    assert generate(router.url, short_body(0))[0] == 200


def test_host_failing_mid_merge_is_routed_around(servers, router):
    """A merge on the second host fails after commit (KV move on rank 1) with streams on it:
    the host goes out of service and exits; requests sent through the router meanwhile are
    served by the first host, exactly; the router's metrics count the failure. The host is
    then restarted on its port and the router takes it back."""
    victim, survivor = servers[1], servers[0]
    status = requests.get(victim.url + "/gyges/status", timeout=30).json()
    for inst in status["instances"]:
        if inst["tp"] > 1:  # merged by an earlier test: split it back first
            r = requests.post(victim.url + "/gyges/split", json={"ranks": inst["ranks"]},
                              timeout=120)
            assert r.status_code == 200, r.text
    streams, threads = {}, []
    for i in range(2):
        ids = [random.Random(50 + i).randrange(300, 1000) for _ in range(20)]
        streams[i] = []
        threads.append(threading.Thread(target=_stream_quietly,
                                        args=(victim.url, ids, streams[i]), daemon=True))
        threads[-1].start()
    deadline = time.monotonic() + 60
    while min(len(c) for c in streams.values()) < 2:
        assert time.monotonic() < deadline, \
            f"streams did not start on the victim: {_state(victim)}"
        time.sleep(0.05)
    FAULT_FILE.write_text("merge:kv_move:1")
    r = requests.post(victim.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=60)
    assert r.status_code == 500 and "transformation failed on rank 1" in r.text, r.text
    bodies = [short_body(300 + i) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: generate(router.url, b), bodies))
    assert [s for s, _ in results] == [200] * len(bodies), results
    direct = [generate(survivor.url, b)[1]["text"] for b in bodies]
    assert [r["text"] for _, r in results] == direct
    for t in threads:
        t.join(timeout=60)
        assert not t.is_alive(), "a stream on the failed host never returned"
    # the merge met live work: not every stream on the host finished normally
    finished = [((c[-1].get("meta_info") or {}).get("finish_reason") or {}).get("type")
                for c in streams.values()]
    assert any(f != "length" for f in finished), finished
    assert victim.proc is not None and victim.proc.wait(timeout=60) != 0
    metrics = requests.get(router.url + "/metrics", timeout=10).text
    failures = [line for line in metrics.splitlines() if line.startswith(
        "gyges_router_worker_failures_total") and f'worker="{victim.url}"' in line]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in failures) >= 1, metrics
    FAULT_FILE.unlink()
    victim.proc = None
    restarted = SGLangServer(victim.model, dp_size=2, gyges=True, max_total_tokens=RANK_TOKENS,
                             extra_args=["--gyges-split-hold-down", "60"], port=victim.port)
    restarted.start()
    servers[1] = restarted
    deadline = time.monotonic() + 60
    while not by_url(router.status())[victim.url]["is_healthy"]:
        assert time.monotonic() < deadline, "the router did not take the restarted host back"
        time.sleep(0.5)


def _state(server: SGLangServer) -> str:
    """A host's health, status and log tail, for a failure message (flaky in CI only)."""
    try:
        health = requests.get(server.url + "/health", timeout=5).status_code
        status = requests.get(server.url + "/gyges/status", timeout=5).json()
        brief = {k: status.get(k) for k in ("instances", "transformation", "held")}
    except requests.RequestException as e:
        health, brief = -1, {"error": str(e)}
    alive = server.proc is not None and server.proc.poll() is None
    lines = [x for x in server.log_path.read_text(errors="replace").splitlines()
             if "server_args=" not in x and "Ignore import error" not in x]
    return (f"alive={alive} health={health} status={json.dumps(brief)[:1500]}\nlog tail:\n"
            + "\n".join(lines[-40:]))


def _stream_quietly(url: str, ids: list[int], chunks: list[dict]) -> None:
    try:
        stream_generate(url, ids, 600, chunks=chunks)
    except requests.RequestException:
        pass  # cut by the host's exit


def test_killing_one_server_mid_run_keeps_serving(servers, router):
    victim, survivor = servers[1], servers[0]
    params = {"max_new_tokens": 16, "temperature": 0}
    bodies = [dict(short_body(200 + i), sampling_params=params) for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(generate, router.url, b) for b in bodies]
        deadline = time.monotonic() + 60
        while by_url(router.status())[victim.url]["outstanding_requests"] == 0:
            assert time.monotonic() < deadline, \
                f"no request reached the victim: {by_url(router.status())[victim.url]}; " \
                f"{_state(victim)}"
            time.sleep(0.05)
        assert victim.proc is not None
        os.killpg(victim.proc.pid, signal.SIGKILL)  # with requests in flight on it
        results = [f.result() for f in futs]
    assert [s for s, _ in results] == [200] * len(bodies), [r for s, r in results if s != 200]
    direct = [generate(survivor.url, b)[1]["text"] for b in bodies]
    assert [r["text"] for _, r in results] == direct
    stream = requests.post(router.url + "/generate", json=dict(short_body(1), stream=True),
                           timeout=120)  # fmt: skip
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    dead = by_url(router.status())[victim.url]
    assert dead["is_healthy"] is False and dead["last_error"], json.dumps(dead)
    assert dead["failures"] >= 1  # a request in flight there was retried on the survivor
