"""Issue 13, item 3: a chunked prefill in flight does not hold a merge or a split. The
transformation parks it after its chunk in flight (its chunks done published in the prefix
cache, which moves with the KV) and the new instance prefills only the rest
(gyges.switch.chunked). Outputs equal stock SGLang with the same chunk size, token for
token; nothing is counted as retracted or cached that stock does not count."""
from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from gyges.testing.clients import assert_close, split_all, start_streams, stream_generate
from gyges.testing.server import SGLangServer, tiny_model

pytestmark = pytest.mark.server

CHUNK = 64
FLAGS = ("--chunked-prefill-size", str(CHUNK))
LONG = 2400  # 38 chunks: the prefill spans many steps
NEW_LONG = 24
NEW_SHORT = 1500  # the short streams outlast the rounds below (500 ended before the merge
# in a fresh-clone CI on 2026-12-06)
SHORT = [[(7 * i + 3 * j) % 400 + 5 for j in range(n)] for i, n in enumerate((21, 34))]
ROUNDS = 4


def _long_prompt(seed: int) -> list[int]:
    # tokens 410-1009: no prefix shared with SHORT (5-404), so that cached_tokens compares
    return [(31 * j + 97 * seed) % 600 + 410 for j in range(LONG)]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def fault(tmp_path_factory):
    """A file the server reads ``GYGES_FAULT_INJECT`` from at each phase (empty: none)."""
    path = tmp_path_factory.mktemp("chunked") / "fault"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def srv(model, fault):
    s = SGLangServer(model, dp_size=2, gyges=True, extra_args=FLAGS, max_total_tokens=8192)
    s.env["GYGES_FAULT_INJECT"] = f"@{fault}"
    with s:
        yield s


@pytest.fixture(scope="module")
def stock(model):
    with SGLangServer(model, extra_args=FLAGS, max_total_tokens=8192) as s:
        yield s


def _in_thread(url: str, prompt: list[int], out: list[dict], extra: dict) -> threading.Thread:
    t = threading.Thread(target=stream_generate, args=(url, prompt, NEW_LONG),
                         kwargs={"chunks": out, "extra": extra})
    t.start()
    return t


def _transform_during_prefill(url: str, op: str, rank: int, extra: dict | None = None
                              ) -> tuple[dict, list[int], list]:
    """Send long prompts to ``rank`` and ``op`` ranks [0, 1] while one is prefilling, until
    the transformation parked it (bounded rounds; a round whose prefill had not started or
    had ended is undone and rerun with another delay). Returns the reply, the long prompts
    sent and their streams (threads, chunks)."""
    delay, prompts, streams, log = 0.4, [], [], []
    undo = "split" if op == "merge" else "merge"
    for n in range(ROUNDS):
        prompt, out = _long_prompt(len(prompts) + 10 * (op == "split")), []
        prompts.append(prompt)
        streams.append((_in_thread(url, prompt, out, {**(extra or {}), "routed_dp_rank": rank}),
                        out))
        time.sleep(delay)
        r = requests.post(f"{url}/gyges/{op}", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        log.append((delay, body["requests_moved"], len(out), body["elapsed_ms"]))
        if body["requests_moved"]["chunked_prefills"]:
            print(f"{op} parked a chunked prefill in round {n + 1}: {log}")
            return body, prompts, streams
        # no chunk had run yet (the prompt was still queued) or the prefill had ended
        delay = delay * 2 if body["requests_moved"]["waiting"] else delay / 2
        if n + 1 < ROUNDS:
            r = requests.post(f"{url}/gyges/{undo}", json={"ranks": [0, 1]}, timeout=120)
            assert r.status_code == 200, r.text
    pytest.fail(f"no {op} met a chunked prefill in {ROUNDS} rounds: {log}")


def _check(stock: SGLangServer, prompts: list[list[int]], streams: list,
           extra: dict | None = None) -> None:
    for prompt, (thread, out) in zip(prompts, streams, strict=True):
        thread.join(timeout=300)
        want = stream_generate(stock.url, prompt, NEW_LONG, extra=extra)[-1]
        got = out[-1]
        assert got["output_ids"] == want["output_ids"], "a long request differs from stock"
        for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs",
                    "input_top_logprobs"):
            if key in want["meta_info"]:
                assert_close(got["meta_info"][key], want["meta_info"][key], key)
        assert got["meta_info"]["cached_tokens"] == want["meta_info"]["cached_tokens"]
        assert got["meta_info"]["num_retractions"] == 0


def _resumed_without_recompute(srv: SGLangServer) -> list[tuple[int, int]]:
    """Each park the server logged, with the tokens it published and where it resumes
    (the same, or where its input logprobs start), was followed by a prefill that found
    that many cached (SGLang logs ``#cached-token``): the new instance did not compute the
    parked chunks again. Returns (published, resumes at) per park."""
    log = srv.log_path.read_text(errors="replace")
    parks = [(m.end(), int(m.group(1)), int(m.group(2))) for m in re.finditer(
        r"parked chunked prefill \S+: \d+ of \d+ prompt tokens done, (\d+) published in "
        r"the prefix cache, resumes at (\d+)", log)]
    for end, published, resumes in parks:
        assert f"#cached-token: {resumes}," in log[end:], (
            f"no prefill reused the {resumes} tokens a park published ({published})")
    return [(p, r) for _, p, r in parks]


@pytest.fixture
def split_back(srv):
    yield
    split_all(srv.url)


def test_merge_parks_a_chunked_prefill(srv, stock, split_back):
    threads, got = start_streams(srv.url, SHORT, NEW_SHORT, min_chunks=3,
                                 extras=[{"routed_dp_rank": i} for i in range(2)])
    body, prompts, streams = _transform_during_prefill(srv.url, "merge", rank=0)
    assert body["requests_moved"]["running"] >= 2, body["requests_moved"]
    assert body["members"]["0"]["chunked_prefills_parked"] == 1, body["members"]
    r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    _check(stock, prompts, streams)
    assert _resumed_without_recompute(srv)
    for t in threads:
        t.join(timeout=300)
    for i, prompt in enumerate(SHORT):
        want = stream_generate(stock.url, prompt, NEW_SHORT)[-1]["output_ids"]
        assert got[i][-1]["output_ids"] == want, f"short stream {i} differs from stock"


def test_split_parks_a_chunked_prefill(srv, stock, split_back):
    r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    # input logprobs from position 40: a park after the first chunk (64 tokens) passed it,
    # so the request resumes at 40 and computes those logprobs again (as SGLang does for a
    # retracted request); output logprobs ride along
    logprobs = {"return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 40}
    body, prompts, streams = _transform_during_prefill(srv.url, "split", rank=0,
                                                       extra=logprobs)
    # both ranks of the merged instance parked the same request: one moved
    assert body["requests_moved"]["chunked_prefills"] == 1, body
    _check(stock, prompts, streams, extra=logprobs)
    (inputs,) = {len(c["meta_info"]["input_token_logprobs"]) for c in streams[-1][1]
                 if c["meta_info"].get("input_token_logprobs")}
    assert inputs == len(prompts[-1]) - 40, inputs
    parks = _resumed_without_recompute(srv)
    assert any(resumes == 40 < published for published, resumes in parks), parks


def test_a_merge_refused_after_the_park_leaves_the_prefill_to_resume(srv, stock, fault,
                                                                    split_back):
    """A fault in the merge's exchange (after rank 0 parked its prefill, before anything
    moved) refuses the merge: 409 within the bound, and the parked request resumes on its
    own replica from its chunks done, equal to stock."""
    prompts, streams, log = [], [], []
    for n in range(ROUNDS):
        before = srv.log_path.read_text(errors="replace").count("parked chunked prefill")
        fault.write_text(f"merge:exchange:1:round{n}")  # a new spec each round fires once
        prompt, out = _long_prompt(20 + n), []
        prompts.append(prompt)
        streams.append((_in_thread(srv.url, prompt, out, {"routed_dp_rank": 0}), out))
        time.sleep(0.4)
        t0 = time.monotonic()
        r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        took = time.monotonic() - t0
        fault.write_text("")
        assert r.status_code == 409 and "injected fault" in r.text, r.text
        assert took < 60, took
        after = srv.log_path.read_text(errors="replace").count("parked chunked prefill")
        log.append((n, after - before, len(out)))
        if after > before:
            break
    else:
        pytest.fail(f"no refused merge met a chunked prefill in {ROUNDS} rounds: {log}")
    st = requests.get(srv.url + "/gyges/status", timeout=30).json()
    assert len(st["instances"]) == 2, st["instances"]  # nothing changed
    _check(stock, prompts, streams)
    assert _resumed_without_recompute(srv)
