"""Issue 13: every request kind moves across a live merge and split, outputs equal to stock
SGLang on one replica. Structured output (JSON schema, regex, EBNF), frequency / presence /
repetition penalties, ``min_new_tokens``, ``logit_bias``, a custom logit processor that
reads its request, stop strings and logprobs all stream while dp 2 merges into TP2 and
splits back; each transformation must have moved running requests."""
from __future__ import annotations

import json

import pytest
import requests

from gyges.testing.clients import start_streams, stream_generate
from gyges.testing.logit_processors import NoRepeatLastToken
from gyges.testing.server import SGLangServer, tiny_model

pytestmark = pytest.mark.server

# Long outputs: a scheduler can stall for seconds on this shared 2-core VM, and every stream
# must still be running when the merge comes.
NEW = 1500
FLAGS = ("--enable-custom-logit-processor",)
SCHEMA = {"type": "object", "properties": {"notes": {
    "type": "array", "minItems": 30, "maxItems": 30,
    "items": {"type": "string", "minLength": 40, "maxLength": 40}}},
    "required": ["notes"], "additionalProperties": False}
ITEMS = " \",\" ".join(["item"] * 10)
EBNF = (f'root ::= "[" row "," row "," row "]"\nrow ::= {ITEMS}\n'
        'item ::= ' + " ".join(['[a-z]'] * 40))
REGEX = "([a-z]{40} ){30}"
GRAMMAR_NEW = 4000  # enough for the grammar to end the output, not the token limit

KINDS: dict[str, dict] = {
    "json_schema": {"sampling_params": {"json_schema": json.dumps(SCHEMA),
                                        "ignore_eos": False, "max_new_tokens": GRAMMAR_NEW}},
    "regex": {"sampling_params": {"regex": REGEX, "ignore_eos": False,
                                  "max_new_tokens": GRAMMAR_NEW}},
    "ebnf": {"sampling_params": {"ebnf": EBNF, "ignore_eos": False,
                                 "max_new_tokens": GRAMMAR_NEW}},
    "penalties": {"sampling_params": {"frequency_penalty": 0.7, "presence_penalty": 0.4}},
    "repetition": {"sampling_params": {"repetition_penalty": 1.3}},
    "min_new_tokens_bias": {"sampling_params": {
        "min_new_tokens": NEW, "ignore_eos": False,
        "logit_bias": {"7": 3.0, "11": -2.5, "42": 1.5}}},
    "custom_processor": {"custom_logit_processor": NoRepeatLastToken.to_str(),
                         "sampling_params": {"custom_params": {"banned": [5, 6, 9]}}},
    "stop_and_logprobs": {"return_logprob": True, "top_logprobs_num": 3,
                          "token_ids_logprob": [5, 17],
                          "sampling_params": {"stop": ["zzzz q"]}},
}
PROMPTS = [[(11 * i + 5 * j) % 300 + 5 for j in range(n)]
           for i, n in enumerate((9, 23, 14, 31, 7, 18, 26, 12))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(arch="qwen2", heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def stock_outputs(model):
    extras = list(KINDS.values())
    with SGLangServer(model, extra_args=FLAGS) as stock:
        return [stream_generate(stock.url, p, NEW, extra=e)[-1]
                for p, e in zip(PROMPTS, extras, strict=True)]


def _same(got: dict, want: dict, kind: str) -> None:
    assert got["output_ids"] == want["output_ids"], f"{kind}: output differs from stock"
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"], kind
    for key in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs"):
        if key in want["meta_info"]:
            _close(got["meta_info"][key], want["meta_info"][key], f"{kind} {key}")


def _close(a, b, what: str) -> None:
    if isinstance(b, float) or isinstance(a, float):
        assert abs(a - b) <= 1e-5, (what, a, b)
    elif isinstance(b, list | tuple):
        assert len(a) == len(b), what
        for x, y in zip(a, b, strict=True):
            _close(x, y, what)
    else:
        assert a == b, (what, a, b)


@pytest.fixture(scope="module")
def srv(model):
    # room for every stream's whole budget at once: the DP scheduler admits a request only
    # where its prompt plus max_new_tokens fits, and held streams would start late
    with SGLangServer(model, dp_size=2, gyges=True, extra_args=FLAGS,
                      max_total_tokens=8192) as s:
        yield s


def _warm_grammars(url: str) -> None:
    """Compile each grammar on both replicas first (SGLang caches compiled grammars), so
    the streams below start together and all are still running at the merge."""
    for rank in (0, 1):
        for kind in ("json_schema", "regex", "ebnf"):
            body = {"input_ids": [5, 6, 7], "routed_dp_rank": rank, "sampling_params": {
                **KINDS[kind]["sampling_params"], "max_new_tokens": 2}}
            requests.post(url + "/generate", json=body, timeout=300).raise_for_status()


def test_every_request_kind_moves_across_merge_and_split(srv, stock_outputs):
    assert [o["meta_info"]["completion_tokens"] for o in stock_outputs][:3] != [0, 0, 0]
    _warm_grammars(srv.url)
    # pinned to alternate replicas: both serve every kind of request when the merge comes
    extras = [{**e, "routed_dp_rank": i % 2} for i, e in enumerate(KINDS.values())]
    threads, got = start_streams(srv.url, PROMPTS, NEW, min_chunks=3, extras=extras,
                                 timeout_s=300)
    r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    moved = r.json()["requests_moved"]
    assert moved["running"] + moved["waiting"] == len(PROMPTS), (
        moved, requests.get(srv.url + "/gyges/status", timeout=30).json()["scheduler"])
    r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    after_split = [len(got[i]) for i in range(len(PROMPTS))]
    assert r.json()["requests_moved"]["running"] >= 4, r.json()["requests_moved"]
    for t in threads:
        t.join(timeout=600)
    for i, kind in enumerate(KINDS):
        assert len(got[i]) > after_split[i], f"{kind} ended before the split"
        _same(got[i][-1], stock_outputs[i], kind)
    for i in range(3):
        assert got[i][-1]["meta_info"]["finish_reason"]["type"] == "stop", got[i][-1]
    notes = json.loads(got[0][-1]["text"])["notes"]
    assert len(notes) == 30 and all(len(x) == 40 for x in notes), notes
    words = got[1][-1]["text"].split(" ")
    assert words[-1] == "" and all(len(w) == 40 and w.isalpha() for w in words[:-1]), words
    assert len(words) == 31
    items = got[2][-1]["text"].strip("[]").split(",")
    assert len(items) == 30 and all(len(x) == 40 and x.isalpha() for x in items), items


def _generate(url: str, ids: list[int], rank: int | None = None, new: int = 4) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": new}}
    if rank is not None:
        body["routed_dp_rank"] = rank
    r = requests.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_prefix_cache_survives_merge_and_split(srv):
    """A 600-token prefix cached on both replicas is a cache hit after the merge (on the
    merged instance) and after the split (on the half that holds its pages)."""
    prefix = [(17 * j) % 500 + 5 for j in range(600)]
    for rank in (0, 1):
        _generate(srv.url, prefix + [7, rank + 8], rank)
        assert _generate(srv.url, prefix + [9, rank], rank)["meta_info"]["cached_tokens"] >= 600
    threads, _ = start_streams(srv.url, PROMPTS[:2], 200, min_chunks=3)
    r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["requests_moved"]["running"] >= 1, body["requests_moved"]
    cached = body["members"]["0"]["prefix_tokens_cached"]
    assert cached >= 600, body["members"]["0"]
    assert _generate(srv.url, prefix + [11, 12])["meta_info"]["cached_tokens"] >= 600
    r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["requests_moved"]["running"] >= 1, r.json()["requests_moved"]
    hits = [_generate(srv.url, prefix + [13, rank], rank)["meta_info"]["cached_tokens"]
            for rank in (0, 1)]
    assert max(hits) >= 600, hits
    for t in threads:
        t.join(timeout=300)
