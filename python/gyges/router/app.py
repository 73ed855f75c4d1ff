"""The router's aiohttp application: proxying, retries, worker API, aggregate status."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from gyges.router.auth import RouterKeys, auth_middleware
from gyges.router.metrics import CONTENT_TYPE, RouterMetrics
from gyges.router.need import NeedEstimator
from gyges.router.policy import POLICIES, place
from gyges.router.proxy import Chooser, NoWorkerError, forward_with_retry, pick_any
from gyges.router.status import STATUS_PATH, aggregate
from gyges.router.workers import HealthConfig, HealthMonitor, Worker, WorkerRegistry

logger = logging.getLogger("gyges.router")

GENERATE_PATHS = ("/generate", "/v1/completions", "/v1/chat/completions")
PASSTHROUGH_GET_PATHS = ("/v1/models", "/health", "/model_info", "/get_model_info")


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router is started with (built once from the CLI, never mutated)."""

    worker_urls: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "gyges"
    health: HealthConfig = field(default_factory=HealthConfig)
    connect_timeout_s: float = 5.0
    request_timeout_s: float | None = None
    chars_per_token: float = 4.0
    keys: RouterKeys = field(default_factory=RouterKeys)
    tokenizer: object = None  # loaded from --tokenizer-path: exact prompt lengths

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")


def error_response(status: int, message: str, kind: str = "router_error") -> web.Response:
    """An OpenAI-style error body, which SGLang's own errors also follow."""
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


class Router:
    """Owns the registry, the client session and the health monitor of one router app."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.registry = WorkerRegistry(self.metrics)
        self.estimator = NeedEstimator(config.chars_per_token, config.tokenizer)
        self.session: aiohttp.ClientSession | None = None
        self.monitor: HealthMonitor | None = None
        self._rr_counter = 0
        for url in config.worker_urls:
            self.registry.add(url)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, _app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        self.monitor = HealthMonitor(self.registry, self.session, self.config.health,
                                     self.config.keys.worker_headers())
        await self.monitor.probe_all()
        self.monitor.start()
        healthy = sum(1 for w in self.registry.workers() if w.healthy)
        logger.info("router up: %d/%d workers healthy", healthy, len(self.registry.workers()))

    async def stop(self, _app: web.Application) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.session is not None:
            await self.session.close()

    # -- request routes --------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        """Place a generation request by policy and proxy it, retrying before the first byte."""
        body = await request.read()
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error_response(400, f"malformed JSON body: {e}", "invalid_request_error")
        if not isinstance(payload, dict):
            return error_response(400, "JSON body must be an object", "invalid_request_error")
        need = self.estimator.estimate(request.path, payload)

        def choose(exclude: set[str]) -> tuple[Worker, bool] | None:
            workers = {w.id: w for w in self.registry.candidates(exclude)}
            views = [w.view() for w in workers.values()]
            placement = place(self.config.policy, need, views, self._rr_counter)
            if placement is None:
                return None
            self._rr_counter += 1
            chosen = workers[placement.worker_id]
            self.metrics.placed(placement.reason, chosen.url, placement.long)
            if placement.long:
                logger.info("long request (need %d) -> %s: %s", need, chosen.url,
                            placement.reason)
            return chosen, placement.long

        return await self._forward(request, body, choose, need)

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Forward a read-only request (models, health, model info) to any healthy worker."""
        body = await request.read()

        def choose(exclude: set[str]) -> tuple[Worker, bool] | None:
            worker = pick_any(self.registry.candidates(exclude))
            return None if worker is None else (worker, False)

        return await self._forward(request, body, choose, need=None)

    async def _forward(
        self, request: web.Request, body: bytes, choose: Chooser, need: int | None
    ) -> web.StreamResponse:
        assert self.session is not None
        if not self.registry.workers():
            return error_response(
                503, "no workers registered; add one with POST /workers", "no_worker"
            )
        try:
            authorization = self.config.keys.forward_authorization(
                request.headers.get("Authorization"))
            return await forward_with_retry(
                request, body, self.session, self.registry, choose, need, self._timeout(),
                authorization,
            )
        except NoWorkerError as e:
            return error_response(503, str(e), "no_worker")

    def _timeout(self) -> aiohttp.ClientTimeout:
        c = self.config
        return aiohttp.ClientTimeout(
            total=c.request_timeout_s,
            connect=c.connect_timeout_s,
            sock_connect=c.connect_timeout_s,
        )

    async def status(self, _request: web.Request) -> web.Response:
        return web.json_response(aggregate(self.registry, self.config.policy))

    async def metrics_view(self, _request: web.Request) -> web.Response:
        """The router's own Prometheus metrics (not the workers')."""
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": CONTENT_TYPE})

    # -- worker API (sglang-router compatible) ---------------------------------------------
    async def add_worker(self, request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error_response(400, f"malformed JSON body: {e}", "invalid_request_error")
        url = payload.get("url") if isinstance(payload, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return error_response(
                400, 'body must be {"url": "http://host:port"}', "invalid_request_error"
            )
        try:
            worker = self.registry.add(url)
        except ValueError as e:
            return error_response(409, str(e), "conflict")
        assert self.monitor is not None
        await self.monitor.probe(worker)
        logger.info("worker %s added (healthy=%s)", worker.url, worker.healthy)
        return web.json_response(
            {
                "status": "accepted",
                "worker_id": worker.id,
                "url": worker.url,
                "is_healthy": worker.healthy,
                "location": f"/workers/{worker.id}",
                "message": f"worker {worker.url} registered",
            },
            status=202,
        )

    async def list_workers(self, _request: web.Request) -> web.Response:
        workers = self.registry.workers()
        healthy = sum(1 for w in workers if w.healthy)
        return web.json_response(
            {
                "workers": [w.describe(time.monotonic()) for w in workers],
                "total": len(workers),
                "stats": {
                    "healthy_count": healthy,
                    "unhealthy_count": len(workers) - healthy,
                    "prefill_count": 0,
                    "decode_count": 0,
                    "regular_count": len(workers),
                },
            }
        )

    async def get_worker(self, request: web.Request) -> web.Response:
        worker = self.registry.find(request.match_info["worker_id"])
        if worker is None:
            return error_response(404, f"no worker {request.match_info['worker_id']}", "not_found")
        return web.json_response(worker.describe(time.monotonic()))

    async def delete_worker(self, request: web.Request) -> web.Response:
        worker = self.registry.remove(request.match_info["worker_id"])
        if worker is None:
            return error_response(404, f"no worker {request.match_info['worker_id']}", "not_found")
        logger.info("worker %s removed", worker.url)
        return web.json_response(
            {
                "status": "accepted",
                "worker_id": worker.id,
                "url": worker.url,
                "message": f"worker {worker.url} removed",
            },
            status=202,
        )


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text 404/405 and unexpected exceptions into JSON errors."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = f"{request.method} {request.path}: {e.reason}"
        return error_response(e.status, message, "not_found" if e.status == 404 else "http_error")
    except Exception as e:  # keep serving; report the bug to the client and the log
        logger.exception("router error on %s %s", request.method, request.path)
        return error_response(500, f"router error: {type(e).__name__}: {e}")


ROUTER_KEY = web.AppKey("router", Router)


def build_app(config: RouterConfig) -> web.Application:
    """The router application; workers from `config` are probed when it starts."""
    router = Router(config)
    app = web.Application(middlewares=[json_errors, auth_middleware(config.keys)],
                          client_max_size=64 * 1024**2)
    app[ROUTER_KEY] = router
    app.on_startup.append(router.start)
    app.on_cleanup.append(router.stop)
    for path in GENERATE_PATHS:
        app.router.add_post(path, router.generate)
    for path in PASSTHROUGH_GET_PATHS:
        app.router.add_get(path, router.passthrough)
    app.router.add_get("/v1/models/{model:.+}", router.passthrough)
    app.router.add_get(STATUS_PATH, router.status)
    app.router.add_get("/metrics", router.metrics_view)
    app.router.add_post("/workers", router.add_worker)
    app.router.add_get("/workers", router.list_workers)
    app.router.add_get("/workers/{worker_id:.+}", router.get_worker)
    app.router.add_delete("/workers/{worker_id:.+}", router.delete_worker)
    return app
