"""Issue 13: every request kind moves across a live merge and split, outputs equal to stock
SGLang on one replica. Structured output (JSON schema, regex, EBNF), frequency / presence /
repetition penalties, ``min_new_tokens``, ``logit_bias``, a custom logit processor that
reads its request, stop strings and logprobs all stream while dp 2 merges into TP2 and
splits back; each transformation must have moved running requests."""
from __future__ import annotations

import json

import pytest
import requests

from gyges.testing.clients import (
    assert_close,
    split_all,
    start_streams,
    stream_generate,
    wait_for_more_chunks,
)
from gyges.testing.logit_processors import NoRepeatLastToken
from gyges.testing.server import SGLangServer, tiny_model

pytestmark = pytest.mark.server
# The every-kind test is in the slow tier (`-m slow`; ~10 min here: xgrammar-constrained
# decoding is slow on this VM); GYGES_RUN_KINDS=1 is no longer needed.
slow_kinds = pytest.mark.slow

# Long outputs: a scheduler can stall for seconds on this shared 2-core VM, and every stream
# must still be running when the merge comes.
NEW = 1000
# Compact JSON: with any whitespace allowed between tokens, the tiny random model fills
# the schema's output with tabs and newlines until max_new_tokens (stock too).
FLAGS = ("--enable-custom-logit-processor", "--constrained-json-disable-any-whitespace")
SCHEMA = {"type": "object", "properties": {"notes": {
    "type": "array", "minItems": 40, "maxItems": 40,
    "items": {"type": "string", "minLength": 30, "maxLength": 30}}},
    "required": ["notes"], "additionalProperties": False}
ITEMS = " \",\" ".join(["item"] * 6)
EBNF = (f'root ::= "[" row "," row "," row "," row "," row "," row "]"\nrow ::= {ITEMS}\n'
        'item ::= ' + " ".join(['[a-z]'] * 30))
REGEX = "([a-z]{30} ){40}"
GRAMMAR_NEW = 2500  # enough for the grammar to end the output, not the token limit

KINDS: dict[str, dict] = {
    "json_schema": {"sampling_params": {"json_schema": json.dumps(SCHEMA),
                                        "ignore_eos": False, "max_new_tokens": GRAMMAR_NEW}},
    "regex": {"sampling_params": {"regex": REGEX, "ignore_eos": False,
                                  "max_new_tokens": GRAMMAR_NEW}},
    "ebnf": {"sampling_params": {"ebnf": EBNF, "ignore_eos": False,
                                 "max_new_tokens": GRAMMAR_NEW}},
    # one additive penalty per request: SGLang applies its penalizers in the order of a set
    # of classes, which differs between processes, so a row with two of them is not
    # bit-reproducible even between two stock servers
    "frequency": {"sampling_params": {"frequency_penalty": 0.7}},
    "presence": {"sampling_params": {"presence_penalty": 0.4}},
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
# Penalties flatten the top of a tiny random model's distribution: a stream whose KV was
# partly written at TP2 (another all-reduce rounding, ~1e-6 in the logprobs) could meet a
# near tie stock breaks the other way. The stock references of these kinds carry their
# top-2 logprobs; a first differing token is accepted only where stock's own top-2 margin
# is below TIE_MARGIN. (The differences seen before 2026-12-03 evening, margins up to
# 7e-3, were a penalty state off by one token: see test_penalty_state_moves_under_overlap.)
PENALTY_KINDS = {"frequency", "presence", "repetition"}
TIE_MARGIN = 1e-4
# SGLang's overlap scheduler cumulates a penalty token when a step is *prepared*, which
# lags the sampled tokens by one step or not depending on what else was scheduled (a
# prefill of another request in between drops one): with streams starting at different
# times, no two runs, stock or not, have the same penalty state. The every-kind test
# therefore runs both servers without overlap; the overlapped case is tested on its own
# with one stream at a time (test_penalty_state_moves_under_overlap).
SYNC = ("--disable-overlap-schedule",)
PROMPTS = [[(11 * i + 5 * j) % 300 + 5 for j in range(n)]
           for i, n in enumerate((9, 23, 14, 31, 7, 18, 26, 12, 20))]


def _extra(kind: str) -> dict:
    """The request body fields of ``kind``; penalty kinds also return their top-2 logprobs
    (their first differing token, if any, is checked for a near tie)."""
    if kind in PENALTY_KINDS:
        return {**KINDS[kind], "return_logprob": True, "top_logprobs_num": 2}
    return KINDS[kind]


@pytest.fixture(scope="module")
def model():
    return tiny_model(arch="qwen2", heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def stock_outputs(model):
    extras = [_extra(k) for k in KINDS]
    with SGLangServer(model, extra_args=[*FLAGS, *SYNC]) as stock:
        return [stream_generate(stock.url, p, NEW, extra=e)[-1]
                for p, e in zip(PROMPTS, extras, strict=True)]


def _same(got: dict, want: dict, kind: str) -> None:
    assert got["output_ids"] == want["output_ids"], f"{kind}: output differs from stock"
    assert got["meta_info"]["finish_reason"] == want["meta_info"]["finish_reason"], kind
    for key in ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs"):
        if key in want["meta_info"]:
            assert_close(got["meta_info"][key], want["meta_info"][key], f"{kind} {key}")


@pytest.fixture(scope="module")
def srv(model):
    # room for every stream's whole budget at once: SGLang admits a request only while the
    # running ones' remaining max_new_tokens (times its new-token ratio) leave room, and a
    # stream held in a replica's queue would start late
    with SGLangServer(model, dp_size=2, gyges=True, extra_args=FLAGS,
                      max_total_tokens=16384) as s:
        yield s


@pytest.fixture(scope="module")
def srv_sync(model):
    """Like ``srv``, without SGLang's overlap scheduler (see SYNC)."""
    with SGLangServer(model, dp_size=2, gyges=True, extra_args=[*FLAGS, *SYNC],
                      max_total_tokens=16384) as s:
        yield s


@pytest.fixture
def split_after():
    """Tests merge and split one shared server: whatever happens in a test, its hosts are
    split back after it (a failure between a merge and its split left the next tests a
    merged group: "ranks [0, 1] already form one TP2 instance")."""
    urls: list[str] = []
    yield urls.append
    for url in urls:
        split_all(url)


def _warm_grammars(url: str) -> None:
    """Compile each grammar on both replicas first (SGLang caches compiled grammars), so
    the streams below start together and all are still running at the merge."""
    for rank in (0, 1):
        for kind in ("json_schema", "regex", "ebnf"):
            body = {"input_ids": [5, 6, 7], "routed_dp_rank": rank, "sampling_params": {
                **KINDS[kind]["sampling_params"], "max_new_tokens": 2}}
            requests.post(url + "/generate", json=body, timeout=300).raise_for_status()


@slow_kinds
def test_every_request_kind_moves_across_merge_and_split(srv_sync, stock_outputs,
                                                         split_after):
    srv = srv_sync
    split_after(srv.url)
    assert [o["meta_info"]["completion_tokens"] for o in stock_outputs][:3] != [0, 0, 0]
    _warm_grammars(srv.url)
    # pinned to alternate replicas: both serve every kind of request when the merge comes.
    # The long plain streams start first, the grammar ones (they end sooner, by their
    # grammar) last, so that all are still running at the merge.
    extras = [{**_extra(k), "routed_dp_rank": i % 2} for i, k in enumerate(KINDS)]
    order = [*range(3, len(PROMPTS)), *range(3)]
    history = []
    for _attempt in range(3):
        threads, got = [], {}
        for part in (order[:-3], order[-3:]):
            th, g = start_streams(srv.url, [PROMPTS[i] for i in part], NEW, min_chunks=3,
                                  extras=[extras[i] for i in part], timeout_s=300)
            threads += th
            got.update({part[j]: chunks for j, chunks in g.items()})
        r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        moved = r.json()["requests_moved"]
        if moved["running"] + moved["waiting"] == len(PROMPTS):
            break
        # Some streams ended before the cutover: one replica ran ~900 tokens ahead while
        # the other took 4 s to admit its third stream (slow-tier run of 2026-12-07). Such
        # an attempt proves nothing; its streams end, the group splits, and it is repeated.
        history.append((moved, [len(got[i]) for i in range(len(PROMPTS))]))
        for t in threads:
            t.join(timeout=600)
        r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
    else:
        raise AssertionError(f"the merge never met every stream: {history}")
    r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    after_split = [len(got[i]) for i in range(len(PROMPTS))]
    assert r.json()["requests_moved"]["running"] >= 4, r.json()["requests_moved"]
    for t in threads:
        t.join(timeout=600)
    wrong, ties = [], []
    for i, kind in enumerate(KINDS):
        assert len(got[i]) > after_split[i], f"{kind} ended before the split"
        if kind in PENALTY_KINDS:
            tie = _tie_at_first_difference(got[i][-1], stock_outputs[i])
            if tie is not None:
                ties.append(f"{kind}: {tie}")
                continue
        try:
            _same(got[i][-1], stock_outputs[i], kind)
        except AssertionError as e:
            ours, theirs = got[i][-1]["output_ids"], stock_outputs[i]["output_ids"]
            first = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False))
                          if a != b), None)
            wrong.append(f"{kind} (first differing token {first}): {str(e)[:200]}")
    assert not wrong, wrong
    if ties:
        print("near ties broken the other way:", ties)
    for i in range(3):
        assert got[i][-1]["meta_info"]["finish_reason"]["type"] == "stop", got[i][-1]
    # xgrammar's JSON strings admit raw control characters (stock's output has them too),
    # which Python's strict parser rejects
    notes = json.loads(got[0][-1]["text"], strict=False)["notes"]
    # 40 strings; their lengths are the grammar's business (equal to stock's above): one
    # run on 2026-12-03 decoded some to other than 30 characters, not understood yet
    assert len(notes) == 40 and all(isinstance(x, str) for x in notes), notes
    print("json_schema note lengths:", sorted({len(x) for x in notes}))
    words = got[1][-1]["text"].split(" ")
    assert words[-1] == "" and all(len(w) == 30 and w.isalpha() for w in words[:-1]), words
    assert len(words) == 41
    items = got[2][-1]["text"].strip("[]").split(",")
    assert len(items) == 36 and all(len(x) == 30 and x.isalpha() for x in items), items


def _tie_at_first_difference(got: dict, want: dict) -> str | None:
    """Where ``got`` first differs from stock and stock's top-2 logprob margin there is below
    TIE_MARGIN, say so; None if the outputs are equal. A difference where stock had a clear
    winner fails the test."""
    ours, theirs = got["output_ids"], want["output_ids"]
    first = next((j for j, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                 None)
    if first is None:
        return None
    top = want["meta_info"]["output_top_logprobs"][first]
    margin = top[0][0] - top[1][0]
    assert margin < TIE_MARGIN, (f"first differing token {first}: stock's top-2 margin "
                                 f"{margin:.3g} is no tie", top)
    return f"token {first} of {len(theirs)}, stock margin {margin:.2g}"


def _generate(url: str, ids: list[int], rank: int | None = None, new: int = 4) -> dict:
    body = {"input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": new}}
    if rank is not None:
        body["routed_dp_rank"] = rank
    r = requests.post(url + "/generate", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_prefix_cache_survives_merge_and_split(srv, split_after):
    """A 600-token prefix cached on both replicas is a cache hit after the merge (on the
    merged instance) and after the split (on the half that holds its pages)."""
    split_after(srv.url)
    prefix = [(17 * j) % 500 + 5 for j in range(600)]
    for rank in (0, 1):
        _generate(srv.url, prefix + [7, rank + 8], rank)
        assert _generate(srv.url, prefix + [9, rank], rank)["meta_info"]["cached_tokens"] >= 600
    # 1500 tokens: the streams must outlast the merge, the cache probe and the split (200
    # had ended before the merge on CI's machine at 526be0f)
    threads, _ = start_streams(srv.url, PROMPTS[:2], 1500, min_chunks=3)
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


PENALTY_NEW = 600  # the stream outlasts the merge, 60 chunks at TP2 and the split
PENALTY_ROUNDS = 3


@pytest.fixture(scope="module")
def stock_penalties(model):
    """Stock SGLang (overlap scheduler on, its default): one penalty stream at a time."""
    with SGLangServer(model, extra_args=FLAGS) as stock:
        return {k: stream_generate(stock.url, PROMPTS[i], PENALTY_NEW, extra=_extra(k))[-1]
                for i, k in enumerate(KINDS) if k in PENALTY_KINDS}


@pytest.mark.parametrize("kind", sorted(PENALTY_KINDS))
def test_penalty_state_moves_under_overlap(srv, stock_penalties, kind, split_after):
    """One penalized stream through a merge and a split with SGLang's overlap scheduler:
    token for token and logprobs within 1e-5 of stock. The penalizers' rows are copied,
    and the step the settle processed early cumulates the token SGLang's loop would have
    (gyges.switch.request_state); a replay of the outputs was one token off here."""
    split_after(srv.url)
    i, want, log = list(KINDS).index(kind), stock_penalties[kind], []
    for _ in range(PENALTY_ROUNDS):
        threads, got = start_streams(srv.url, [PROMPTS[i]], PENALTY_NEW, min_chunks=40,
                                     extras=[{**_extra(kind), "routed_dp_rank": 1}],
                                     timeout_s=300)
        seen = got[0][-1]["meta_info"]["completion_tokens"]
        r = requests.post(srv.url + "/gyges/merge", json={"ranks": [0, 1]}, timeout=120)
        assert r.status_code == 200, r.text
        moved = r.json()["requests_moved"]
        log.append((seen, moved))
        if moved["running"] == 1:
            break
        # The client read chunk 40 long after the server sent it (a 2-core VM starves the
        # client: 2026-12-06, 1 round of 19 in a loop here read 178 tokens when the server
        # had sent all 600; once in CI), so the stream ended before the merge. It must have
        # ended whole and equal to stock; the round proves nothing more: split, stream again.
        threads[0].join(timeout=300)
        assert got[0][-1]["meta_info"]["completion_tokens"] == PENALTY_NEW, log
        _same(got[0][-1], want, kind)
        split_all(srv.url)
    else:
        pytest.fail(f"the stream ended before the merge in {PENALTY_ROUNDS} rounds: {log}")
    wait_for_more_chunks(got, 60, timeout_s=300)
    r = requests.post(srv.url + "/gyges/split", json={"ranks": [0, 1]}, timeout=120)
    assert r.status_code == 200, r.text
    # requests_moved is the first half's; the stream may go to either half
    members = r.json()["members"].values()
    assert max(m["running"] for m in members) == 1, r.json()["members"]
    threads[0].join(timeout=300)
    out = got[0][-1]
    assert out["meta_info"]["completion_tokens"] == PENALTY_NEW
    _same(out, want, kind)
