"""Over-capacity requests on a dp 2 server whose replicas hold 1024 KV slots each (tiny
Llama, float32 CPU, --enable-metrics): a request larger than the largest possible instance
(TP2: 2 x 1016 usable slots) gets a 400 at once, on /generate and as an OpenAI error
object, and the server keeps serving; the refusals and the policy's decisions are counted
on SGLang's /metrics."""
from __future__ import annotations

import time

import openai
import pytest
import requests

from gyges.testing.clients import generate_ids
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA

SHORT = [[5, 9, 11, 40], [(3 * j) % 200 + 7 for j in range(30)]]
NEW_TOKENS = 16


def status(url: str) -> dict:
    return requests.get(url + "/gyges/status", timeout=30).json()


@pytest.fixture(scope="module")
def srv():
    with SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True, max_total_tokens=1024,
                      extra_args=["--enable-metrics"]) as s:
        yield s


@pytest.fixture(scope="module")
def before(srv):
    return [generate_ids(srv.url, x, NEW_TOKENS) for x in SHORT]


def test_limits_in_status(srv):
    st = status(srv.url)
    assert st["max_request_tokens"] == 2 * (1024 - 8)
    assert st["scheduler"]["policy"] == "gyges" and st["scheduler"]["reserved"] == []


def test_over_capacity_is_refused_at_once_and_the_server_keeps_serving(srv, before):
    t0 = time.monotonic()
    r = requests.post(srv.url + "/generate", timeout=30, json={
        "input_ids": [5] * 2100, "sampling_params": {"max_new_tokens": 8}})
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert "2108 tokens" in msg and "TP2" in msg and "2032" in msg
    r = requests.post(srv.url + "/generate", timeout=30, json={"input_ids": [5] * 1950})
    assert r.status_code == 400 and "default" in r.json()["error"]["message"]  # + 128 new
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[7] * 100, max_tokens=3000)
    assert e.value.status_code == 400 and "largest instance" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=4000,
                                       messages=[{"role": "user", "content": "hello"}])
    body = e.value.body  # SGLang's OpenAI error object
    assert body["object"] == "error" and body["code"] == 400
    assert "largest instance" in body["message"]
    assert time.monotonic() - t0 < 10
    assert [generate_ids(srv.url, x, NEW_TOKENS) for x in SHORT] == before
    st = status(srv.url)["scheduler"]
    assert st["pending"] == [] and not st["counters"]["auto_merges"]


def test_prometheus_counters(srv):
    text = requests.get(srv.url + "/metrics", timeout=30).text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line.startswith("gyges:")}
    assert samples["gyges:rejected_requests_total"] >= 4
    assert samples['gyges:decisions_total{kind="dispatch"}'] >= 1
    assert "gyges:pending_requests" in samples
