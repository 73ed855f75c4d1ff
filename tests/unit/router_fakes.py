"""In-process fake SGLang workers and a router harness on loopback ephemeral ports."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any, NamedTuple

import aiohttp
from aiohttp import web

from gyges.router.app import ROUTER_KEY, Router, RouterConfig, build_app
from gyges.router.need import NeedEstimator
from gyges.router.workers import HealthConfig

FAST_HEALTH = HealthConfig(
    interval_s=0.2, timeout_s=2.0, failure_threshold=1, status_interval_s=0.05, status_timeout_s=1.0
)


def completion_text(prompt: str, n: int) -> list[str]:
    """The fake model: n 'tokens' derived from the prompt only (same on every worker)."""
    return [f"{prompt[i % max(1, len(prompt))] if prompt else '_'}{i} " for i in range(n)]


class FakeWorker:
    """A stand-in for an SGLang server: /generate, /v1/*, /health and optionally /gyges/status.

    gyges: False -> /gyges/status is 404 (stock server); True -> a simulated status whose
    instances reflect the requests in flight (long ones in a merged TP2 instance of ranks 0-1).
    fail: None, "drop" (close the connection before answering), "drop_after_headers"
    (event streams: headers, then close), "drop_mid_stream" (two chunks, then close),
    "unavailable" (503, as a Gyges host out of service answers).
    key: when set, every route but /health answers 401 without ``Bearer key``; ``auth_seen``
    records the Authorization header of every request.
    """

    def __init__(
        self,
        name: str,
        *,
        gyges: bool = True,
        dp: int = 2,
        cap: int = 1000,
        max_tp: int = 2,
        chunk_delay_s: float = 0.0,
        hold_s: float = 0.0,
    ) -> None:
        self.name, self.gyges, self.dp, self.cap, self.max_tp = name, gyges, dp, cap, max_tp
        self.chunk_delay_s, self.hold_s = chunk_delay_s, hold_s
        self.fail: str | None = None
        self.key: str | None = None
        self.auth_seen: list[str | None] = []
        self.requests: list[tuple[str, Any]] = []
        self.inflight: dict[int, int] = {}
        self.max_concurrent_long = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application(middlewares=[self._check_key])
        for path in ("/generate", "/v1/completions", "/v1/chat/completions"):
            app.router.add_post(path, self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/gyges/status", self.status)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _check_key(self, request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization")
        self.auth_seen.append(header)
        if self.key and request.path != "/health" and header != f"Bearer {self.key}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        return await handler(request)

    # -- endpoints ---------------------------------------------------------------------
    async def health(self, _r: web.Request) -> web.Response:
        return web.Response()

    async def models(self, _r: web.Request) -> web.Response:
        model = {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}
        return web.json_response({"object": "list", "data": [model]})

    async def status(self, _r: web.Request) -> web.Response:
        if not self.gyges:
            raise web.HTTPNotFound()
        return web.json_response(self.simulated_status())

    def simulated_status(self) -> dict[str, Any]:
        long = [n for n in self.inflight.values() if n > self.cap]
        short = [n for n in self.inflight.values() if n <= self.cap]
        instances, first = [], 0
        if long:
            instances.append(self._inst([0, 1], sum(long), len(long)))
            first = 2
        tp1 = [self._inst([r], 0, 0) for r in range(first, self.dp)]
        for n in short:
            if tp1:
                target = min(tp1, key=lambda i: i["used_tokens"])
                target["used_tokens"] += n
                target["running"] += 1
        return {
            "kv_layout": "head_major",
            "mlp_storage": "padded",
            "max_tp": self.max_tp,
            "dp_size": self.dp,
            "max_request_tokens": self.cap * self.max_tp,
            "instances": instances + tp1,
        }

    def _inst(self, ranks: list[int], used: int, running: int) -> dict[str, Any]:
        return {
            "ranks": ranks,
            "tp": len(ranks),
            "leader": ranks[0],
            "capacity_tokens": self.cap * len(ranks),
            "used_tokens": used,
            "running": running,
            "waiting": 0,
        }

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append((request.path, body))
        if self.fail == "unavailable":
            return web.json_response({"error": "out of service: test"}, status=503)
        if self.fail == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        key = id(body)
        self.inflight[key] = NeedEstimator().estimate(request.path, body)
        self.max_concurrent_long = max(
            self.max_concurrent_long, sum(1 for n in self.inflight.values() if n > self.cap)
        )
        try:
            await asyncio.sleep(self.hold_s)
            return await self._answer(request, body)
        finally:
            self.inflight.pop(key, None)

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        prompt, n = _prompt_and_len(request.path, body)
        tokens = completion_text(prompt, n)
        if body.get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await out.prepare(request)
            for i, event in enumerate(_events(request.path, tokens)):
                if self.fail == "drop_after_headers" or (self.fail == "drop_mid_stream" and i == 2):
                    assert request.transport is not None
                    request.transport.abort()
                    return out
                await out.write(f"data: {json.dumps(event)}\n\n".encode())
                await asyncio.sleep(self.chunk_delay_s)
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        if request.path == "/generate" and body.get("text") == "bad":
            return web.json_response({"error": {"message": "bad prompt"}}, status=400)
        return web.json_response(_final(request.path, tokens), headers={"X-Worker": self.name})


def _prompt_and_len(path: str, body: dict[str, Any]) -> tuple[str, int]:
    if path == "/generate":
        return str(body.get("text", "")), int(
            body.get("sampling_params", {}).get("max_new_tokens", 4)
        )
    if path == "/v1/completions":
        return str(body.get("prompt", "")), int(body.get("max_tokens", 4))
    return str(body["messages"][-1]["content"]), int(body.get("max_tokens", 4))


def _events(path: str, tokens: list[str]) -> list[dict[str, Any]]:
    if path == "/generate":
        return [{"text": "".join(tokens[: i + 1]), "meta_info": {}} for i in range(len(tokens))]
    if path == "/v1/completions":
        return [
            {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "fake-model",
                "choices": [{"index": 0, "text": t, "finish_reason": None, "logprobs": None}],
            }
            for t in tokens
        ]
    return [
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "fake-model",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": t}, "finish_reason": None}
            ],
        }
        for t in tokens
    ]


def _final(path: str, tokens: list[str]) -> dict[str, Any]:
    text = "".join(tokens)
    if path == "/generate":
        return {"text": text, "meta_info": {"completion_tokens": len(tokens)}}
    if path == "/v1/completions":
        return {
            "id": "c",
            "object": "text_completion",
            "created": 0,
            "model": "fake-model",
            "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
        }
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": "fake-model",
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": text},
            }
        ],
    }


@contextlib.asynccontextmanager
async def running_router(
    urls: list[str], policy: str = "gyges", **overrides: Any
) -> AsyncIterator[tuple[str, Router]]:
    """Start the router app on an ephemeral loopback port; yields (base url, Router)."""
    config = replace(RouterConfig(tuple(urls), policy=policy, health=FAST_HEALTH), **overrides)
    app = build_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app[ROUTER_KEY]
    finally:
        await runner.cleanup()


class Harness(NamedTuple):
    """A running router in front of running fakes, and a client session."""

    url: str
    router: Router
    worker_urls: list[str]
    session: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def harness(*workers: FakeWorker, policy: str = "gyges",
                  **overrides: Any) -> AsyncIterator[Harness]:
    """Start the fakes, a router in front of them and a client session; stop all at the end."""
    async with (
        fake_workers(*workers) as urls,
        running_router(urls, policy, **overrides) as (url, router),
        aiohttp.ClientSession() as session,
    ):
        yield Harness(url, router, urls, session)


@contextlib.asynccontextmanager
async def fake_workers(*workers: FakeWorker) -> AsyncIterator[list[str]]:
    """Start the fakes; stop them all at the end."""
    try:
        yield [await w.start() for w in workers]
    finally:
        for w in workers:
            await w.stop()


def run_async(fn: Any) -> Any:
    """Run an async test function with asyncio.run (no pytest-asyncio needed)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(asyncio.wait_for(fn(*args, **kwargs), timeout=30))

    return wrapper


async def wait_for(cond: Any, timeout_s: float = 5.0) -> None:
    """Poll `cond()` until true."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)
