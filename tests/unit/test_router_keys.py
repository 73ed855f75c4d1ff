"""The router's keys (client, admin, worker), its /metrics, 503 retries and the tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from router_fakes import FakeWorker, harness, run_async, wait_for

from gyges.router.auth import AuthLevel, RouterKeys, allowed, level_of
from gyges.router.metrics import reason_label
from gyges.router.need import NeedEstimator, TokenizerError, load_tokenizer

GEN = {"text": "hello world", "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
USER, ADMIN, WORKER = "u-key", "a-key", "w-key"
PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize("api, admin, level, header, ok", [
    (None, None, AuthLevel.ADMIN_OPTIONAL, None, True),
    (USER, None, AuthLevel.ADMIN_OPTIONAL, USER, True),
    (USER, None, AuthLevel.ADMIN_OPTIONAL, None, False),
    (None, ADMIN, AuthLevel.ADMIN_OPTIONAL, ADMIN, True),
    (None, ADMIN, AuthLevel.ADMIN_OPTIONAL, None, False),
    (USER, ADMIN, AuthLevel.ADMIN_OPTIONAL, USER, False),
    (USER, ADMIN, AuthLevel.ADMIN_OPTIONAL, ADMIN, True),
    (USER, ADMIN, AuthLevel.NORMAL, USER, True),
    (USER, ADMIN, AuthLevel.NORMAL, ADMIN, False),
    (None, ADMIN, AuthLevel.NORMAL, None, True),
    (USER, ADMIN, AuthLevel.OPEN, None, True),
])
def test_decision_matches_sglang(api, admin, level, header, ok):
    keys = RouterKeys(api, admin)
    assert allowed(level, f"Bearer {header}" if header else None, keys) is ok


def test_levels():
    assert level_of("/workers") is level_of("/workers/abc") is AuthLevel.ADMIN_OPTIONAL
    assert level_of("/gyges/status") is AuthLevel.ADMIN_OPTIONAL
    assert level_of("/health") is level_of("/metrics") is AuthLevel.OPEN
    assert level_of("/generate") is level_of("/v1/models") is AuthLevel.NORMAL
    assert level_of("/workersX") is AuthLevel.NORMAL


async def _status(session: aiohttp.ClientSession, method: str, url: str,
                  key: str | None, body: object = None) -> int:
    async with session.request(method, url, json=body, headers=bearer(key)) as resp:
        await resp.read()
        return resp.status


@run_async
async def test_key_matrix_and_worker_key_replaces_the_clients():
    a, b = FakeWorker("a"), FakeWorker("b")
    a.key = b.key = WORKER
    keys = RouterKeys(USER, ADMIN, WORKER)
    async with harness(a, b, keys=keys) as h:
        await wait_for(lambda: all(w.healthy for w in h.router.registry.workers()))
        s, u = h.session, h.url
        for key, want in ((USER, 200), (None, 401), (ADMIN, 401), ("nope", 401)):
            assert await _status(s, "POST", u + "/generate", key, GEN) == want, key
            assert await _status(s, "GET", u + "/v1/models", key) == want, key
        for key, want in ((ADMIN, 200), (None, 401), (USER, 401)):
            assert await _status(s, "GET", u + "/workers", key) == want, key
            assert await _status(s, "GET", u + "/gyges/status", key) == want, key
            if want != 200:
                assert await _status(s, "POST", u + "/workers", key,
                                     {"url": "http://127.0.0.1:9"}) == want
                assert await _status(s, "DELETE", u + f"/workers/{a.url}", key) == want
        assert await _status(s, "GET", u + "/health", None) == 200
        assert await _status(s, "GET", u + "/metrics", None) == 200
        # workers only ever saw the worker key (health, status polls, proxied requests)
        seen = set(a.auth_seen + b.auth_seen)
        assert seen == {f"Bearer {WORKER}"}, seen
        # the router polled the keyed workers' status: the gyges policy is in force
        assert all(w.is_gyges for w in h.router.registry.workers())
        assert await _status(s, "POST", u + "/workers", ADMIN, {"url": "http://127.0.0.1:9"}) \
            == 202
        assert await _status(s, "DELETE", u + "/workers/http://127.0.0.1:9", ADMIN) == 202


@run_async
async def test_admin_key_alone_guards_workers_only():
    w = FakeWorker("a")
    async with harness(w, keys=RouterKeys(None, ADMIN)) as h:
        await wait_for(lambda: all(x.healthy for x in h.router.registry.workers()))
        assert await _status(h.session, "POST", h.url + "/generate", None, GEN) == 200
        assert await _status(h.session, "POST", h.url + "/workers", None,
                             {"url": "http://127.0.0.1:9"}) == 401
        assert await _status(h.session, "POST", h.url + "/generate", ADMIN, GEN) == 200
        # the client's key is the router's: it is not passed on to workers
        assert f"Bearer {ADMIN}" not in w.auth_seen


@run_async
async def test_keyed_worker_without_worker_key_is_reported():
    w = FakeWorker("a")
    w.key = WORKER
    async with harness(w) as h:
        worker = h.router.registry.workers()[0]
        await wait_for(lambda: worker.status_error is not None)
        assert "--worker-api-key" in worker.status_error


@run_async
async def test_unavailable_worker_is_retried_and_counted_in_metrics():
    bad, good = FakeWorker("bad"), FakeWorker("good")
    bad.fail = "unavailable"
    async with harness(bad, good, policy="round_robin") as h:
        await wait_for(lambda: all(x.healthy for x in h.router.registry.workers()))
        for _ in range(4):
            async with h.session.post(h.url + "/generate", json=GEN) as resp:
                assert resp.status == 200 and resp.headers["X-Worker"] == "good"
        async with h.session.get(h.url + "/metrics") as resp:
            text = await resp.text()
    assert f'gyges_router_retries_total{{worker="{bad.url}"}} 1.0' in text, text
    assert f'gyges_router_worker_failures_total{{kind="request",worker="{bad.url}"}} 1.0' \
        in text, text
    assert f'gyges_router_requests_total{{worker="{good.url}"}}' in text
    # four requests, one of them placed twice (on bad, then on good)
    assert 'gyges_router_placements_total{reason="round-robin"} 5.0' in text, text


def test_reason_labels_drop_numbers():
    assert reason_label("merge-tp2-cost40") == "merge"
    assert reason_label("merge-underway-tp4") == "merge-underway"
    assert reason_label("tp1-free") == "tp1-free"


def test_tokenizer_counts_exactly(tmp_path):
    from gyges.testing.tiny_model import build_tokenizer

    build_tokenizer(400, 0).save_pretrained(tmp_path)
    tok = load_tokenizer(str(tmp_path))
    est = NeedEstimator(tokenizer=tok)
    text = "the model token cache merge split " * 20
    body = {"text": text, "sampling_params": {"max_new_tokens": 7}}
    assert est.estimate("/generate", body) == len(tok.encode(text)) + 7
    chat = {"messages": [{"role": "user", "content": text}], "max_tokens": 3}
    rendered = tok.apply_chat_template(chat["messages"], tokenize=False,
                                       add_generation_prompt=True)
    want = len(tok.encode(rendered, add_special_tokens=False)) + 3
    assert est.estimate("/v1/chat/completions", chat) == want
    assert est.estimate("/generate", {"input_ids": [1, 2, 3]}) == 3 + 128


def test_bad_tokenizer_path_is_a_startup_error(tmp_path):
    with pytest.raises(TokenizerError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path))  # an empty directory
    proc = subprocess.run(
        [sys.executable, "-m", "gyges.router", "--worker-urls", "http://127.0.0.1:9",
         "--tokenizer-path", str(tmp_path / "missing")],
        capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(PYTHON_DIR), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot load the tokenizer" in lines[0], proc.stderr
