"""Forwarding one HTTP request to a worker: bodies byte for byte, event streams chunk by chunk.

Retry rule: a request is retried on another worker as long as its client has not received a
byte (a worker answering 503, out of service, counts as failing before the first byte). Plain
responses are read whole before anything is sent, so a worker dying at any point
of a non-streaming request is retried; an event stream is committed once its first chunk has
been passed on, and a worker dying after that ends the stream with an SSE error event.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gyges.router.workers import Worker, WorkerRegistry

logger = logging.getLogger("gyges.router")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
UPSTREAM_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)

Chooser = Callable[[set[str]], "tuple[Worker, bool] | None"]


class NoWorkerError(Exception):
    """No healthy worker is left to take the request (answered as 503)."""


class UpstreamUnavailable(Exception):
    """The worker failed before the client received a byte: the request may be retried."""


def pick_any(workers: Sequence[Worker]) -> Worker | None:
    """The worker with the fewest requests in flight (for read-only passthrough requests)."""
    return min(workers, key=lambda w: len(w.inflight), default=None)


async def forward_with_retry(
    request: web.Request,
    body: bytes,
    session: aiohttp.ClientSession,
    registry: WorkerRegistry,
    choose: Chooser,
    need: int | None,
    timeout: aiohttp.ClientTimeout,
    authorization: str | None = None,
) -> web.StreamResponse:
    """Forward to `choose(tried)`'s worker; on UpstreamUnavailable take it out and choose again.

    `need` (tokens) is booked on the worker while the request is in flight; None books nothing.
    `authorization` replaces the client's ``Authorization`` header (None: sent without one).
    Raises NoWorkerError when no worker is left to try.
    """
    tried: set[str] = set()
    errors: list[str] = []
    while (choice := choose(tried)) is not None:
        worker, long = choice
        tried.add(worker.id)
        ticket = registry.begin(worker, need, long) if need is not None else None
        try:
            return await forward_once(request, body, session, worker, timeout, registry,
                                      authorization)
        except UpstreamUnavailable as e:
            registry.mark_unreachable(worker, str(e))
            registry.metrics.retries.labels(worker.url).inc()
            errors.append(f"{worker.url}: {e}")
            logger.warning("retrying %s elsewhere: %s failed: %s", request.path, worker.url, e)
        finally:
            if ticket is not None:
                registry.end(worker, ticket)
    if errors:
        raise NoWorkerError("no worker could take the request; tried " + "; ".join(errors))
    down = [f"{w.url} ({w.last_error or 'not healthy yet'})" for w in registry.workers()]
    raise NoWorkerError("no healthy worker can take the request; workers: " + ", ".join(down))


async def forward_once(
    request: web.Request,
    body: bytes,
    session: aiohttp.ClientSession,
    worker: Worker,
    timeout: aiohttp.ClientTimeout,
    registry: WorkerRegistry,
    authorization: str | None = None,
) -> web.StreamResponse:
    """Proxy one request to one worker; raises UpstreamUnavailable before the first byte out."""
    headers = _filter_headers(request.headers)
    headers.popall("Authorization", None)
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        resp = await session.request(
            request.method,
            worker.url + str(request.rel_url),
            data=body or None,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
        )
    except UPSTREAM_ERRORS as e:
        raise UpstreamUnavailable(f"{type(e).__name__}: {e}") from e
    async with resp:
        if resp.status == 503:  # out of service (a failed transformation) or shutting down
            try:
                text = (await resp.text(errors="replace"))[:200]
            except UPSTREAM_ERRORS:
                text = ""
            raise UpstreamUnavailable(f"answered HTTP 503: {text}")
        out_headers = _filter_headers(resp.headers)
        if resp.content_type != "text/event-stream":
            try:
                data = await resp.read()
            except UPSTREAM_ERRORS as e:
                raise UpstreamUnavailable(f"{type(e).__name__}: {e}") from e
            return web.Response(status=resp.status, body=data, headers=out_headers)
        try:
            chunk = await resp.content.readany()
        except UPSTREAM_ERRORS as e:
            raise UpstreamUnavailable(f"{type(e).__name__}: {e}") from e
        out = web.StreamResponse(status=resp.status, headers=out_headers)
        await out.prepare(request)
        while chunk:
            try:
                await out.write(chunk)
            except ConnectionResetError:  # the client went away: closing resp aborts upstream
                logger.info("client left %s; aborting it on %s", request.path, worker.url)
                return out
            try:
                chunk = await resp.content.readany()
            except UPSTREAM_ERRORS as e:
                registry.mark_unreachable(worker, f"failed mid-stream: {type(e).__name__}: {e}",
                                          "mid_stream")
                await _write_quietly(out, _sse_error(f"worker {worker.url} failed mid-stream"))
                break
        await out.write_eof()
        return out


def _filter_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        if key.lower() not in HOP_BY_HOP:
            out.add(key, value)
    return out


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "worker_failed", "code": 502}}
    return f"data: {json.dumps(body)}\n\n".encode()


async def _write_quietly(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except ConnectionResetError:
        pass
