"""Overlapped merge and split (KV pre-copied while the members serve, then a short cutover)
of a dp 2 server (tiny Llama, float32 CPU) with streams in flight.

Every output is compared token for token with the same request on the untransformed
server; every transformation must have met running requests (``requests_moved``). A pre-copy
is stretched (``GYGES_PRECOPY_ROUND_FLOOR_S``, read from a file) where requests must
finish, arrive or abort while it runs; a fault is armed through ``GYGES_FAULT_INJECT``'s
file. The failure test runs last: it leaves the group's pre-copy disabled.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from gyges.testing.clients import split_all, stream_generate
from gyges.testing.server import SGLangServer, tiny_model
from gyges.testing.tiny_model import LLAMA_GQA

LONG = [[(11 * i + 5 * j) % 500 + 3 for j in range(n)] for i, n in enumerate((420, 300, 510, 380))]
PREFIX = [(3 * j) % 700 + 9 for j in range(600)]
# Tokens of the streams that must outlive the transformations of a test: a decode step of
# this model takes a few ms with one OpenMP thread per scheduler, and a stream that ended
# before a merge would prove nothing.
NEW = 1500


@pytest.fixture(scope="module")
def knobs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("precopy")
    paths = {"fault": d / "fault", "floor": d / "floor", "staging": d / "staging"}
    for p in paths.values():
        p.write_text("")
    return paths


@pytest.fixture(scope="module")
def srv(knobs):
    s = SGLangServer(tiny_model(LLAMA_GQA), dp_size=2, gyges=True, max_total_tokens=8192)
    s.env["GYGES_FAULT_INJECT"] = f"@{knobs['fault']}"
    s.env["GYGES_PRECOPY_ROUND_FLOOR_S"] = f"@{knobs['floor']}"
    s.env["GYGES_PRECOPY_MAX_STAGING_MB"] = f"@{knobs['staging']}"
    s.env["GYGES_EXIT_GRACE_S"] = "4"
    with s:
        yield s


@pytest.fixture(autouse=True)
def split_after(srv):
    """A test that failed while merged leaves the next one the two TP1 replicas (a CI run
    once failed three tests here for one)."""
    yield
    split_all(srv.url)


def _ref(url: str, prompt: list[int], new: int) -> list[int]:
    return stream_generate(url, prompt, new)[-1]["output_ids"]


def _refs(url: str, prompts: list[list[int]], new: int) -> list[list[int]]:
    """References computed side by side (one per replica), to keep the module short."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _ref(url, p, new), prompts))


class Stream:
    def __init__(self, url: str, prompt: list[int], new: int, rid: str | None = None) -> None:
        self.chunks: list[dict] = []
        self.error: str | None = None
        self.ended = 0.0
        self.thread = threading.Thread(target=self._run, args=(url, prompt, new, rid),
                                       daemon=True)
        self.thread.start()

    def _run(self, url: str, prompt: list[int], new: int, rid: str | None) -> None:
        try:
            stream_generate(url, prompt, new, rid=rid, chunks=self.chunks)
        except Exception as e:  # noqa: BLE001 - recorded for the test
            self.error = f"{type(e).__name__}: {e}"
        self.ended = time.monotonic()

    def final(self, timeout: float = 300) -> dict:
        self.thread.join(timeout=timeout)
        assert not self.thread.is_alive(), "a stream never returned"
        assert self.error is None and self.chunks, self.error
        return self.chunks[-1]


def _started(streams: list[Stream], chunks: int = 3) -> None:
    deadline = time.monotonic() + 120
    while min(len(s.chunks) for s in streams) < chunks:
        assert time.monotonic() < deadline, "streams did not start"
        time.sleep(0.02)


def _post(url: str, op: str, **body: object) -> tuple[int, dict]:
    r = requests.post(f"{url}/gyges/{op}", json={"ranks": [0, 1], **body}, timeout=180)
    return r.status_code, r.json()


def _post_into(url: str, op: str, result: dict) -> None:
    result["status"], result["out"] = _post(url, op)


def test_streams_cross_an_overlapped_merge_and_split_and_the_cutover_is_small(srv):
    refs = _refs(srv.url, LONG, NEW)
    streams = [Stream(srv.url, p, NEW) for p in LONG]
    _started(streams)
    for op in ("merge", "split"):
        status, out = _post(srv.url, op)
        assert status == 200, out
        pre = out["precopy"]
        assert "skipped" not in pre, pre
        assert out["requests_moved"]["running"] >= 2, out
        assert pre["bytes"] > 0 and pre["staged_bytes_applied"] > 0, pre
        assert out["cutover_kv_bytes"] < 0.1 * pre["bytes"], (out["cutover_kv_bytes"], pre)
        assert out["kv_bytes_moved"] == out["cutover_kv_bytes"] + pre["bytes"]
        assert {"precopy_ms", "cutover_ms"} <= out["elapsed_ms"].keys()
        if op == "split":  # the MLP shards came back while the merged instance served
            assert pre["weight_bytes"] > 0 and out["weight_bytes_restored"] > 0, out
            assert all(m["weight_bytes_restored_in_cutover"] == 0
                       for m in out["members"].values()), out["members"]
        else:
            assert out["weight_bytes_released"] > 0
        time.sleep(0.3)
    for s, want in zip(streams, refs, strict=True):
        final = s.final()
        assert final["output_ids"] == want
        assert final["meta_info"]["num_retractions"] == 0


def test_requests_finish_arrive_and_abort_during_a_precopy(srv, knobs):
    """While a stretched pre-copy runs (>= 8 s): a short request finishes, new ones arrive
    (one finishes and caches a 600-token prefix), one is aborted. The merge carries the
    survivors over exactly, and the prefix is a cache hit after it; same for the split."""
    short, arrive = [(5 * j) % 90 + 4 for j in range(30)], [(2 * j) % 80 + 6 for j in range(50)]
    with_prefix = PREFIX + [1, 2, 3]
    refs = {"long": _ref(srv.url, LONG[0], 3 * NEW), "short": _ref(srv.url, short, 6),
            "arrive": _ref(srv.url, arrive, 120), "prefix": _ref(srv.url, with_prefix, 4)}
    knobs["floor"].write_text("4")
    try:
        for n, op in enumerate(("merge", "split")):
            long = Stream(srv.url, LONG[0], 3 * NEW)
            doomed = Stream(srv.url, LONG[1], 2 * NEW, rid=f"doomed-{n}")
            _started([long, doomed])
            result: dict = {}
            health: list[int] = []
            t0, wall0 = time.monotonic(), time.time()
            worker = threading.Thread(target=_post_into, args=(srv.url, op, result), daemon=True)
            worker.start()
            probes = threading.Thread(target=_probe_health, args=(srv.url, worker, health),
                                      daemon=True)
            probes.start()
            time.sleep(0.4)
            events = [Stream(srv.url, short, 6, rid=f"short-{n}"), Stream(srv.url, arrive, 120),
                      Stream(srv.url, with_prefix, 4)]
            time.sleep(0.3)
            requests.post(srv.url + "/abort_request", json={"rid": f"doomed-{n}"}, timeout=30)
            worker.join(timeout=120)
            probes.join(timeout=30)
            assert result.get("status") == 200, result
            # /health asks the controller (2 s budget) while the job is polled over the
            # same channel: it must not answer 503 mid-transformation. Each probe takes
            # >= 1 s (SGLang's /health waits for its health request) and several on this
            # loaded box, so how many fit the transformation varies (2 to 6 seen)
            assert health and set(health) == {200}, health
            out, done = result["out"], time.monotonic()
            assert out["precopy"]["ms"] >= 7500, out["precopy"]  # the events met it
            assert out["requests_moved"]["running"] >= 1, out
            assert events[0].final()["output_ids"] == refs["short"]
            # the controller's clock started after t0: this bound is the stricter one
            precopy_end = t0 + out["elapsed_ms"]["precopy_ms"] / 1e3
            assert events[0].ended < min(done, precopy_end), _late(srv.url, f"short-{n}",
                                                                  events[0], t0, wall0, out)
            assert events[1].final()["output_ids"] == refs["arrive"]
            assert events[2].final()["output_ids"] == refs["prefix"]
            finish = doomed.final()["meta_info"]["finish_reason"]
            assert finish["type"] == "abort", finish
            assert long.final()["output_ids"] == refs["long"]
            if op == "merge":  # one instance now: the prefix cached during the pre-copy
                again = stream_generate(srv.url, PREFIX + [7, 8], 4)[-1]
                assert again["meta_info"]["cached_tokens"] >= 600, again["meta_info"]
    finally:
        knobs["floor"].write_text("")


def _probe_health(url: str, worker: threading.Thread, statuses: list[int]) -> None:
    """``GET /health`` every 0.5 s while ``worker`` (a merge or split) runs."""
    while worker.is_alive():
        statuses.append(requests.get(url + "/health", timeout=30).status_code)
        time.sleep(0.5)


def _late(url: str, rid: str, event: Stream, t0: float, wall0: float, out: dict) -> str:
    """Where a request that should have finished during the pre-copy went: the
    scheduler's decisions about it (seconds after the POST) and its chunks' count."""
    decisions = requests.get(url + "/gyges/status", timeout=30).json()["scheduler"]["decisions"]
    mine = [{**d, "t": round(d["t"] - wall0, 3)} for d in decisions if d["rid"] == rid]
    return (f"{rid} ended {event.ended - t0:.3f}s after the POST ({len(event.chunks)} chunks); "
            f"decisions: {mine}; reply elapsed_ms: {out['elapsed_ms']}, "
            f"precopy: {out.get('precopy')}")


def test_no_staging_memory_means_stop_the_world_and_the_next_one_precopies(srv, knobs):
    refs = _refs(srv.url, LONG[:2], NEW)
    streams = [Stream(srv.url, p, NEW) for p in LONG[:2]]
    _started(streams)
    knobs["staging"].write_text("0.01")  # 10 KiB: less than one round needs
    try:
        status, out = _post(srv.url, "merge")
    finally:
        knobs["staging"].write_text("")
    assert status == 200, out
    assert "pre-copy unavailable" in out["precopy"]["skipped"], out["precopy"]
    assert out["requests_moved"]["running"] >= 1 and out["cutover_kv_bytes"] > 0, out
    status, out = _post(srv.url, "split")  # the side group is intact: pre-copied again
    assert status == 200 and out["precopy"]["bytes"] > 0, out
    for s, want in zip(streams, refs, strict=True):
        assert s.final()["output_ids"] == want


def test_a_failed_precopy_changes_nothing_and_later_transformations_stop_the_world(srv,
                                                                                    knobs):
    refs = _refs(srv.url, LONG[:2], NEW)
    knobs["fault"].write_text("merge:precopy:1")
    streams = [Stream(srv.url, p, NEW) for p in LONG[:2]]
    _started(streams)
    t0 = time.monotonic()
    status, out = _post(srv.url, "merge")
    assert status == 409 and "pre-copy failed on rank 1" in out["error"], out
    assert time.monotonic() - t0 < 60
    assert requests.get(srv.url + "/health", timeout=10).status_code == 200
    st = requests.get(srv.url + "/gyges/status", timeout=10).json()
    assert [i["tp"] for i in st["instances"]] == [1, 1]
    # fresh, longer streams: the first ones may end while the refused merge unwinds (the
    # 2 cores are busy: seconds pass between a stream's start and the next merge)
    later_refs = _refs(srv.url, LONG[:2], 3 * NEW)
    later = [Stream(srv.url, p, 3 * NEW) for p in LONG[:2]]
    _started(later)
    status, out = _post(srv.url, "merge")
    assert status == 200, out
    assert "pre-copy" in out["precopy"]["skipped"], out["precopy"]
    assert out["requests_moved"]["running"] >= 1, out
    status, out = _post(srv.url, "split")
    assert status == 200 and "skipped" in out["precopy"], out
    for s, want in zip(streams + later, refs + later_refs, strict=True):
        assert s.final()["output_ids"] == want
