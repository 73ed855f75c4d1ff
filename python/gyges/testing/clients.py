"""HTTP client helpers for tests, demos and benchmarks: greedy outputs of a fixed prompt set."""
from __future__ import annotations

import json
import threading
import time

import requests

PROMPTS = (
    "the model serves a long request",
    "one two three four five six seven",
    "merge the replica group and split it back after the long prompt is done",
    "why is the river near the mountain city so fast",
)


def generate_ids(url: str, input_ids: list[int], max_new_tokens: int = 16) -> list[int]:
    r = requests.post(url + "/generate", timeout=120, json={
        "input_ids": input_ids,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                            "ignore_eos": True},
    })
    r.raise_for_status()
    return r.json()["output_ids"]


def generate_text(url: str, text: str, max_new_tokens: int = 16) -> dict:
    r = requests.post(url + "/generate", timeout=120, json={
        "text": text,
        "sampling_params": {"temperature": 0, "max_new_tokens": max_new_tokens,
                            "ignore_eos": True},
    })
    r.raise_for_status()
    out = r.json()
    return {"text": out["text"], "output_ids": out["output_ids"]}


def chat(url: str, content: str, max_tokens: int = 12) -> dict:
    r = requests.post(url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": content}],
    })
    r.raise_for_status()
    choice = r.json()["choices"][0]
    return {"content": choice["message"]["content"], "finish": choice["finish_reason"]}


def greedy_outputs(url: str) -> dict:
    """Greedy outputs for a fixed prompt set, sent one at a time (identical batches)."""
    ids = [[(7 * i + 13 * j) % 300 + 5 for j in range(n)] for i, n in enumerate((3, 9, 24, 57))]
    return {
        "ids": [generate_ids(url, x) for x in ids],
        "text": [generate_text(url, p) for p in PROMPTS],
        "chat": [chat(url, p) for p in PROMPTS[:2]],
    }


STREAM_READ_BYTES = 1 << 20


def stream_generate(url: str, input_ids: list[int], max_new_tokens: int,
                    rid: str | None = None, chunks: list[dict] | None = None,
                    headers: dict[str, str] | None = None,
                    extra: dict | None = None) -> list[dict]:
    """Every chunk of a streaming ``/generate`` (the last one is the full output), appended
    to ``chunks`` (if given) as they arrive. Greedy unless ``extra`` says otherwise:
    ``extra["sampling_params"]`` updates the sampling parameters, its other keys the body."""
    extra = dict(extra or {})
    sampling = {"temperature": 0, "max_new_tokens": max_new_tokens, "ignore_eos": True,
                **extra.pop("sampling_params", {})}
    body: dict = {"input_ids": input_ids, "stream": True, "sampling_params": sampling,
                  **extra}
    if rid is not None:
        body["rid"] = rid
    chunks = [] if chunks is None else chunks
    with requests.post(url + "/generate", json=body, stream=True, timeout=600,
                       headers=headers) as r:
        r.raise_for_status()
        assert r.headers.get("transfer-encoding") == "chunked", r.headers
        # One read per HTTP chunk (SGLang sends one event per chunk): the default 512-byte
        # reads re-join every event from pieces, about 3x the client's CPU per event, and
        # each event carries the whole output so far. A starved client reads late.
        for line in r.iter_lines(chunk_size=STREAM_READ_BYTES):
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunks.append(json.loads(data))
    return chunks


def wait_until_streaming(url: str, count: int, timeout_s: float = 60.0) -> None:
    """Wait until the host's instances report ``count`` running requests in all."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = requests.get(url + "/gyges/status", timeout=30).json()
        if sum(i["running"] for i in st["instances"]) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} requests running after {timeout_s}s")
        time.sleep(0.1)


def start_streams(url: str, prompts: list[list[int]], max_new_tokens: int,
                  min_chunks: int = 2, timeout_s: float = 120.0,
                  headers: dict[str, str] | None = None,
                  extras: list[dict] | None = None
                  ) -> tuple[list[threading.Thread], dict[int, list[dict]]]:
    """Start one streaming request per prompt in its own thread; return once each has
    streamed ``min_chunks`` chunks. Chunks accumulate in the returned dict by prompt index.
    ``extras[i]``: what stream i adds to its request (see :func:`stream_generate`)."""
    got: dict[int, list[dict]] = {i: [] for i in range(len(prompts))}
    threads = [threading.Thread(target=stream_generate, args=(url, p, max_new_tokens),
                                kwargs={"chunks": got[i], "headers": headers,
                                        "extra": extras[i] if extras else None})
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    while min(len(c) for c in got.values()) < min_chunks:
        if time.monotonic() > deadline:
            raise TimeoutError(f"streams did not start within {timeout_s}s")
        time.sleep(0.05)
    return threads, got


def wait_for_more_chunks(got: dict[int, list[dict]], chunks: int,
                         timeout_s: float = 120.0) -> None:
    """Wait until every unfinished stream of ``got`` (from :func:`start_streams`) has
    streamed ``chunks`` more chunks than now: it decoded in the current configuration.
    Raises AssertionError after ``timeout_s``."""
    start = {i: len(c) for i, c in got.items()}
    deadline = time.monotonic() + timeout_s
    while any(len(c) - start[i] < chunks and not c[-1]["meta_info"].get("finish_reason")
              for i, c in got.items()):
        assert time.monotonic() < deadline, "streams stalled"
        time.sleep(0.05)


def merge_and_split_through(url: str, threads: list[threading.Thread],
                            got: dict[int, list[dict]], ranks: list[int] | None = None,
                            merge_running: int = 2, timeout_s: float = 300.0) -> None:
    """Merge ``ranks`` (default [0, 1]) while the streams of :func:`start_streams` run, let
    each decode 3 more chunks, split back, and join the streams. Asserts that the merge moved
    at least ``merge_running`` running requests and the split at least one."""
    ranks = ranks or [0, 1]
    for op, least in (("merge", merge_running), ("split", 1)):
        r = requests.post(f"{url}/gyges/{op}", json={"ranks": ranks}, timeout=timeout_s)
        assert r.status_code == 200, r.text
        assert r.json()["requests_moved"]["running"] >= least, (op, r.json()["requests_moved"])
        if op == "merge":
            wait_for_more_chunks(got, 3, timeout_s=timeout_s)
    for t in threads:
        t.join(timeout=2 * timeout_s)


def abort_once_past(url: str, threads: list[threading.Thread], got: dict[int, list[dict]],
                    tokens: int, timeout_s: float = 600.0) -> list[dict]:
    """Wait until every stream of :func:`start_streams` has streamed ``tokens`` output
    tokens, abort them all (``/abort_request`` ``abort_all``) and join them; return each
    stream's longest chunk (its output so far). For streams that ask for more tokens than a
    test compares, so that none ends before the transformations it must meet: a greedy
    output of a longer request begins with the shorter one's. A stream that ends on its
    own first fails (its output count and finish reason are listed)."""
    def done(chunks: list[dict]) -> int:
        return max((len(c.get("output_ids", ())) for c in chunks), default=0)

    deadline = time.monotonic() + timeout_s
    while min(done(c) for c in got.values()) < tokens:
        assert all(t.is_alive() for t in threads), [
            (done(c), c[-1]["meta_info"].get("finish_reason") if c else None)
            for c in got.values()]
        assert time.monotonic() < deadline, "streams stalled"
        time.sleep(0.1)
    r = requests.post(url + "/abort_request", json={"rid": "", "abort_all": True}, timeout=30)
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "aborted streams did not end"
    return [max((c for c in got[i] if "output_ids" in c), key=lambda c: len(c["output_ids"]))
            for i in sorted(got)]


def split_all(url: str, timeout_s: float = 120.0) -> None:
    """Split every merged instance of the host back to TP1 replicas (test cleanup: a test
    that failed between its merge and its split must not leave the next test a merged
    group). Errors are ignored; each call is bounded by ``timeout_s``."""
    try:
        st = requests.get(url + "/gyges/status", timeout=30).json()
    except (requests.RequestException, ValueError):
        return
    for inst in st.get("instances", []):
        if len(inst.get("ranks", [])) > 1:
            try:
                requests.post(url + "/gyges/split", json={"ranks": inst["ranks"]},
                              timeout=timeout_s)
            except requests.RequestException:
                pass


def assert_close(a: object, b: object, what: str, tol: float = 1e-5) -> None:
    """``a`` equals ``b`` (nested lists/tuples of logprob entries): floats within ``tol``,
    everything else exactly; ``what`` names the field in the failure."""
    if isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= tol, (what, a, b)  # type: ignore[operator]
    elif isinstance(b, list | tuple):
        assert isinstance(a, list | tuple) and len(a) == len(b), what
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, what, tol)
    else:
        assert a == b, (what, a, b)


def transform_meeting_streams(url: str, ranks: list[int], prompts: list[list[int]],
                              max_new_tokens: int, min_running: int, attempts: int = 3,
                              extras: list[dict] | None = None, timeout_s: float = 180.0
                              ) -> tuple[list[threading.Thread], dict[int, list[dict]], dict]:
    """Start one stream per prompt (:func:`start_streams`), then ``POST /gyges/merge`` on
    ``ranks``; return the streams and the reply once the merge moved at least
    ``min_running`` running requests. An attempt whose streams had ended before the cutover
    (a slow or paused machine) proves nothing: its streams are joined, the group split
    back and the attempt repeated; after
    ``attempts`` the AssertionError lists each attempt's moves and timings (a merge that is
    slow every time fails the test)."""
    history = []
    for _ in range(attempts):
        threads, got = start_streams(url, prompts, max_new_tokens, min_chunks=3,
                                     extras=extras)
        before = [len(c) for c in got.values()]
        r = requests.post(f"{url}/gyges/merge", json={"ranks": ranks}, timeout=timeout_s)
        assert r.status_code == 200, r.text
        out = r.json()
        if out["requests_moved"]["running"] >= min_running:
            return threads, got, out
        history.append({"moved": out["requests_moved"],
                        "elapsed_ms": out.get("elapsed_ms"),
                        "chunks": [before, [len(c) for c in got.values()]]})
        for t in threads:
            t.join(timeout=600)
        r = requests.post(f"{url}/gyges/split", json={"ranks": ranks}, timeout=timeout_s)
        assert r.status_code == 200, r.text
    raise AssertionError(f"the merge never met {min_running} running streams: {history}")
