"""Hook on ``sglang.srt.entrypoints.http_server``: the ``/gyges/*`` routes.

Added to SGLang's FastAPI app just before it starts serving; they forward to the host
controller over the control channel.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the route's annotations here

from gyges.control.channel import async_request, control_address
from gyges.hooks.server_args import gyges_config
from gyges.hooks.tokenizer_manager import install_limits

TARGET = "sglang.srt.entrypoints.http_server._setup_and_run_http_server"
TRANSFORM_TIMEOUT_S = 300.0
JOB_POLL_S = 0.05  # between polls of a running merge/split (the controller never waits)
MAX_BODY_BYTES = 64 * 1024


def before_setup_and_run_http_server(server_args: Any, tokenizer_manager: Any,
                                     template_manager: Any, port_args: Any,
                                     *args: Any, **kwargs: Any) -> None:
    config = gyges_config(server_args)
    if config is None:
        return
    from sglang.srt.entrypoints import http_server

    install_routes(http_server.app, control_address(port_args.tokenizer_ipc_name),
                   api_key=getattr(server_args, "api_key", None),
                   admin_api_key=getattr(server_args, "admin_api_key", None))
    scheduler_infos = args[0] if args else kwargs.get("scheduler_infos")
    if tokenizer_manager is not None and scheduler_infos:
        install_limits(tokenizer_manager, config, scheduler_infos[0],
                       int(server_args.page_size or 1))


class HealthGate:
    """Pure ASGI middleware: SGLang's health routes answer 503 while this host is out of
    service (or its controller does not answer); otherwise SGLang's own handler runs."""

    PATHS = ("/health", "/health_generate")

    def __init__(self, app: Any, out_of_service: Any) -> None:
        self.app, self.out_of_service = app, out_of_service

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") in self.PATHS:
            why = await self.out_of_service()
            if why:
                from starlette.responses import JSONResponse

                response = JSONResponse({"error": f"out of service: {why}"}, status_code=503)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class RefusedRoutes:
    """Pure ASGI middleware: SGLang's routes that would rewrite or read the model's weights
    as SGLang loaded them answer 400 with SGLang's own ``{"success", "message"}`` body. Under
    Gyges the MLP weights live in padded shards (released on a merge) and the attention
    weights are resliced per TP degree, so SGLang's weight loaders no longer fit them (an
    ``/update_weights_from_disk`` ended the scheduler with an IndexError)."""

    WHY = ("{path} is not supported with --enable-gyges: the MLP weights live in padded "
           "shards that a merge releases and a split restores, and SGLang's weight loaders "
           "address the weights as loaded; restart the server with the new weights")
    PATHS = frozenset((
        "/update_weights_from_disk", "/update_weights_from_tensor",
        "/update_weights_from_distributed", "/update_weights_from_ipc",
        "/init_weights_update_group", "/begin_weight_update", "/end_weight_update",
        "/init_weights_send_group_for_remote_instance", "/send_weights_to_remote_instance",
        "/get_weights_by_name",
    ))

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path") if scope["type"] == "http" else None
        if path in self.PATHS:
            from starlette.responses import JSONResponse

            response = JSONResponse({"success": False, "message": self.WHY.format(path=path)},
                                    status_code=400)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_routes(app: Any, address: str, *, api_key: str | None = None,
                   admin_api_key: str | None = None) -> None:
    """``/gyges/merge``, ``/gyges/split`` and ``/gyges/debug/*`` are ADMIN_OPTIONAL like
    SGLang's own admin routes (``--admin-api-key`` only; else ``--api-key``; else open);
    ``/gyges/status`` is an ordinary route that shows process ids to admins only. Bodies
    over 64 KiB get 413. ``/health`` answers 503 while the host is out of service; the
    weight-update routes answer 400 (:class:`RefusedRoutes`)."""
    from fastapi.responses import ORJSONResponse
    from sglang.srt.utils.auth import AuthLevel, auth_level, decide_request_auth

    def is_admin(request: Request) -> bool:
        return decide_request_auth(
            method=request.method, path=request.url.path,
            authorization_header=request.headers.get("authorization"), api_key=api_key,
            admin_api_key=admin_api_key, auth_level=AuthLevel.ADMIN_OPTIONAL).allowed

    async def gyges_status(request: Request) -> ORJSONResponse:
        try:
            reply = await async_request(address, {"op": "status"}, timeout_s=10.0)
        except TimeoutError as e:
            return ORJSONResponse({"error": str(e)}, status_code=503)
        if not reply.pop("ok"):
            return ORJSONResponse({"error": reply["error"]}, status_code=reply["status"])
        if is_admin(request):
            reply["processes"]["http_server"] = {"pid": os.getpid()}
        else:
            reply.pop("processes", None)
        return ORJSONResponse(reply)

    async def out_of_service() -> str | None:
        try:
            reply = await async_request(address, {"op": "health"}, timeout_s=2.0)
        except TimeoutError:
            return "the Gyges host controller does not answer"
        return reply.get("out_of_service") if reply.get("ok") else reply.get("error")

    async def gyges_comm_check(request: Request) -> ORJSONResponse:
        """Debug/admin: all-reduce over the pooled group ``{"ranks": [...]}``."""
        ranks = await _read_ranks(request)
        if isinstance(ranks, ORJSONResponse):
            return ranks
        return await _forward({"op": "comm_check", "ranks": ranks}, timeout_s=60.0)

    async def _read_ranks(request: Request) -> list[Any] | ORJSONResponse:
        body = await _read_body(request)
        return body if isinstance(body, ORJSONResponse) else body["ranks"]

    async def _read_body(request: Request) -> dict[str, Any] | ORJSONResponse:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY_BYTES:
            return ORJSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"},
                                  status_code=413)
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                return ORJSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"},
                                      status_code=413)
        try:
            body = json.loads(raw)
        except ValueError as e:
            return ORJSONResponse({"error": f"body is not valid JSON: {e}"}, status_code=400)
        if not isinstance(body, dict) or "ranks" not in body:
            return ORJSONResponse({"error": 'body must be a JSON object {"ranks": [...]}'},
                                  status_code=400)
        if not isinstance(body.get("precopy", True), bool):
            return ORJSONResponse({"error": '"precopy" must be true or false'},
                                  status_code=400)
        return body

    async def _transform(op: str, request: Request) -> ORJSONResponse:
        body = await _read_body(request)
        if isinstance(body, ORJSONResponse):
            return body
        try:
            reply = await async_request(address, {"op": op, "ranks": body["ranks"],
                                                  "precopy": body.get("precopy", True)},
                                        timeout_s=30.0)
            if not reply.pop("ok"):
                return ORJSONResponse({"error": reply["error"]}, status_code=reply["status"])
            job = reply["job"]
            deadline = time.monotonic() + TRANSFORM_TIMEOUT_S
            while time.monotonic() < deadline:
                reply = await async_request(address, {"op": "job", "job": job},
                                            timeout_s=30.0)
                if not reply.pop("ok"):
                    return ORJSONResponse({"error": reply["error"]},
                                          status_code=reply["status"])
                if reply["done"]:
                    return ORJSONResponse(reply["result"])
                await asyncio.sleep(JOB_POLL_S)
        except TimeoutError as e:
            return ORJSONResponse({"error": str(e)}, status_code=503)
        return ORJSONResponse({"error": f"{op} did not finish in {TRANSFORM_TIMEOUT_S:g}s"},
                              status_code=504)

    async def gyges_merge(request: Request) -> ORJSONResponse:
        """Merge an idle aligned group into one TP-k instance: ``{"ranks": [...]}``."""
        return await _transform("merge", request)

    async def gyges_split(request: Request) -> ORJSONResponse:
        """Split a merged instance (all its ranks) into its two halves."""
        return await _transform("split", request)

    async def _forward(msg: dict[str, Any], timeout_s: float) -> ORJSONResponse:
        try:
            reply = await async_request(address, msg, timeout_s=timeout_s)
        except TimeoutError as e:
            return ORJSONResponse({"error": str(e)}, status_code=503)
        if not reply.pop("ok"):
            return ORJSONResponse({"error": reply["error"]}, status_code=reply["status"])
        return ORJSONResponse(reply)

    admin = auth_level(AuthLevel.ADMIN_OPTIONAL)
    app.add_api_route("/gyges/status", gyges_status, methods=["GET"])
    app.add_api_route("/gyges/debug/comm_check", admin(gyges_comm_check), methods=["POST"])
    app.add_api_route("/gyges/merge", admin(gyges_merge), methods=["POST"])
    app.add_api_route("/gyges/split", admin(gyges_split), methods=["POST"])
    app.add_middleware(HealthGate, out_of_service=out_of_service)
    app.add_middleware(RefusedRoutes)
