"""The router against in-process fake workers on loopback: proxying, streaming, failures, API."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
from router_fakes import FakeWorker, harness, run_async, wait_for

GEN = {"text": "hello world", "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
STREAM = dict(GEN, stream=True)


async def post(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, object]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def post_raw(session: aiohttp.ClientSession, url: str, body: object) -> tuple[int, bytes]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.read()


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


@run_async
async def test_proxies_all_paths_like_direct_requests():
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    bodies = {
        "/generate": GEN,
        "/v1/completions": {"model": "m", "prompt": "abc", "max_tokens": 3},
        "/v1/chat/completions": chat,
    }
    async with harness(FakeWorker("a"), FakeWorker("b", gyges=False)) as h:
        s, direct_url = h.session, h.worker_urls[1]
        for path, body in bodies.items():
            assert await post(s, h.url + path, body) == await post(s, direct_url + path, body)
        for path in ("/v1/models", "/health"):
            async with s.get(h.url + path) as resp, s.get(direct_url + path) as want:
                assert (resp.status, await resp.read()) == (want.status, await want.read())
        # Worker errors pass through unchanged.
        bad = {"text": "bad", "sampling_params": {"max_new_tokens": 2}}
        assert await post(s, h.url + "/generate", bad) == (
            400,
            {"error": {"message": "bad prompt"}},
        )


@run_async
async def test_stream_is_passed_through_chunk_by_chunk():
    async with harness(FakeWorker("a", chunk_delay_s=0.15)) as h:
        async with h.session.post(h.url + "/generate", json=STREAM) as resp:
            assert resp.status == 200 and resp.content_type == "text/event-stream"
            arrivals, data = [], b""
            async for chunk in resp.content.iter_any():
                arrivals.append(time.monotonic())
                data += chunk
        async with h.session.post(h.worker_urls[0] + "/generate", json=STREAM) as direct:
            assert data == await direct.read()
    assert data.count(b"data: ") == 6  # 5 tokens + [DONE]
    assert len(arrivals) >= 4 and arrivals[-1] - arrivals[0] > 0.4  # not buffered


@run_async
async def test_openai_client_streams_through_router():
    async with harness(FakeWorker("a", chunk_delay_s=0.01)) as h:

        def use_client() -> tuple[list[str | None], list[str]]:
            client = openai.OpenAI(base_url=h.url + "/v1", api_key="none", max_retries=0)
            messages = [{"role": "user", "content": "xyz"}]
            chat = client.chat.completions.create(
                model="m", messages=messages, max_tokens=4, stream=True
            )
            done = client.completions.create(model="m", prompt="pq", max_tokens=3, stream=True)
            return [c.choices[0].delta.content for c in chat], [c.choices[0].text for c in done]

        chat, completion = await asyncio.to_thread(use_client)
    assert chat == ["x0 ", "y1 ", "z2 ", "x3 "]
    assert completion == ["p0 ", "q1 ", "p2 "]


@run_async
async def test_dead_worker_is_retried_elsewhere_and_reported():
    a, b = FakeWorker("a"), FakeWorker("b")
    async with harness(a, b, policy="round_robin") as h:
        await a.stop()  # connection refused from now on; the router has not noticed yet
        for _ in range(4):
            assert (await post(h.session, h.url + "/generate", GEN))[0] == 200
        assert len(b.requests) == 4
        _, listing = await get_json(h.session, h.url + "/workers")
    dead = next(w for w in listing["workers"] if w["url"] == h.worker_urls[0])
    assert dead["is_healthy"] is False and "Connect" in dead["last_error"]
    assert listing["stats"]["healthy_count"] == 1


@run_async
async def test_retry_when_worker_drops_the_connection_before_the_first_byte():
    for mode in ("drop", "drop_after_headers"):
        a, b = FakeWorker("a"), FakeWorker("b")
        a.fail = mode
        async with harness(a, b, policy="round_robin") as h:
            status, data = await post_raw(h.session, h.url + "/generate", STREAM)
        assert status == 200 and data.endswith(b"data: [DONE]\n\n"), mode
        assert len(a.requests) == 1 and len(b.requests) == 1, mode


@run_async
async def test_worker_dying_mid_stream_ends_stream_with_error_event():
    a = FakeWorker("a")
    a.fail = "drop_mid_stream"
    async with harness(a) as h:
        _, data = await post_raw(h.session, h.url + "/generate", STREAM)
        assert data.count(b'"text"') == 2 and b"failed mid-stream" in data
        assert not h.router.registry.workers()[0].healthy


@run_async
async def test_no_worker_gives_503_with_a_message_and_router_keeps_running():
    async with harness() as h:
        status, body = await post(h.session, h.url + "/generate", GEN)
        assert status == 503 and "no workers registered" in body["error"]["message"]
        assert (await get_json(h.session, h.url + "/health"))[0] == 503
    a = FakeWorker("a")
    async with harness(a) as h:
        await a.stop()
        status, body = await post(h.session, h.url + "/v1/completions", {"prompt": "x"})
        assert status == 503 and h.worker_urls[0] in body["error"]["message"]
        status, body = await post(h.session, h.url + "/generate", GEN)  # now known dead
        assert status == 503 and "no healthy worker" in body["error"]["message"]


@run_async
async def test_bad_input_gets_clear_4xx():
    async with harness(FakeWorker("a")) as h:
        status, body = await get_json(h.session, h.url + "/nope")
        assert status == 404 and "/nope" in body["error"]["message"]
        async with h.session.post(h.url + "/generate", data=b"{not json") as resp:
            body = await resp.json()
        assert resp.status == 400 and "malformed JSON" in body["error"]["message"]
        assert (await post(h.session, h.url + "/v1/chat/completions", [1, 2]))[0] == 400
        assert (await get_json(h.session, h.url + "/generate"))[0] == 405
        assert (await post(h.session, h.url + "/generate", GEN))[0] == 200  # still serving


@run_async
async def test_worker_api_add_list_get_delete():
    a, b = FakeWorker("a"), FakeWorker("b")
    async with harness(a) as h:
        s, url_b = h.session, await b.start()
        try:
            status, added = await post(s, h.url + "/workers", {"url": url_b + "/"})
            assert status == 202 and added["url"] == url_b and added["is_healthy"]
            assert (await post(s, h.url + "/workers", {"url": url_b}))[0] == 409
            assert (await post(s, h.url + "/workers", {"nope": 1}))[0] == 400
            _, listing = await get_json(s, h.url + "/workers")
            assert listing["total"] == 2
            assert {w["url"] for w in listing["workers"]} == {h.worker_urls[0], url_b}
            _, one = await get_json(s, h.url + f"/workers/{added['worker_id']}")
            assert one["url"] == url_b
            first = next(w["id"] for w in listing["workers"] if w["url"] == h.worker_urls[0])
            async with s.delete(h.url + f"/workers/{first}") as resp:
                assert resp.status == 202
            async with s.delete(h.url + f"/workers/{first}") as resp:
                assert resp.status == 404
            for _ in range(3):
                assert (await post(s, h.url + "/generate", GEN))[0] == 200
        finally:
            await b.stop()
    assert len(a.requests) == 0 and len(b.requests) == 3


@run_async
async def test_aggregate_status_and_stock_fallback():
    async with harness(FakeWorker("g"), FakeWorker("s", gyges=False)) as h:
        workers = h.router.registry.workers()
        await wait_for(lambda: all(w.is_gyges is not None for w in workers))
        _, agg = await get_json(h.session, h.url + "/gyges/status")
    gw, sw = agg["workers"]
    assert agg["policy"] == "gyges" and gw["gyges"] is True and sw["gyges"] is False
    assert gw["status"]["dp_size"] == 2 and sw["status"] is None
    assert agg["totals"]["instances"] == 2 and agg["totals"]["capacity_tokens"] == 2000


@run_async
async def test_gyges_policy_keeps_long_requests_on_one_host():
    """Long requests (> one replica's 1000 tokens) sent one after another stay on one host (equal
    load: the host that took long requests lately); shorts balance by outstanding requests."""
    a, b = FakeWorker("a", hold_s=0.3), FakeWorker("b", hold_s=0.3)
    long = {"input_ids": [7] * 1200, "sampling_params": {"max_new_tokens": 4}}
    async with harness(a, b) as h:

        async def longs() -> None:
            for _ in range(3):
                assert (await post(h.session, h.url + "/generate", long))[0] == 200

        async def shorts() -> None:
            await asyncio.sleep(0.05)
            for _ in range(4):
                batch = [post(h.session, h.url + "/generate", GEN) for _ in range(3)]
                assert all(status == 200 for status, _ in await asyncio.gather(*batch))

        await asyncio.gather(longs(), shorts())
        _, agg = await get_json(h.session, h.url + "/gyges/status")
    routed = sorted((w["routed_long"], w["routed_short"]) for w in agg["workers"])
    (long_other, short_other), (long_host, short_host) = routed
    assert (long_host, long_other) == (3, 0)
    # Load first: while a long request is in flight there, the other host takes more shorts.
    assert short_other >= short_host
    assert agg["totals"]["routed_long"] == 3 and agg["totals"]["routed_short"] == 12
