"""Hook on ``sglang.srt.entrypoints.http_server``: the ``/gyges/*`` routes.

Added to SGLang's FastAPI app just before it starts serving; they forward to the host
controller over the control channel.
"""
from __future__ import annotations

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


def before_setup_and_run_http_server(server_args: Any, tokenizer_manager: Any,
                                     template_manager: Any, port_args: Any,
                                     *args: Any, **kwargs: Any) -> None:
    config = gyges_config(server_args)
    if config is None:
        return
    from sglang.srt.entrypoints import http_server

    install_routes(http_server.app, control_address(port_args.tokenizer_ipc_name))
    scheduler_infos = args[0] if args else kwargs.get("scheduler_infos")
    if tokenizer_manager is not None and scheduler_infos:
        install_limits(tokenizer_manager, config, scheduler_infos[0],
                       int(server_args.page_size or 1))


def install_routes(app: Any, address: str) -> None:
    from fastapi.responses import ORJSONResponse

    async def gyges_status() -> ORJSONResponse:
        try:
            reply = await async_request(address, {"op": "status"}, timeout_s=10.0)
        except TimeoutError as e:
            return ORJSONResponse({"error": str(e)}, status_code=503)
        if not reply.pop("ok"):
            return ORJSONResponse({"error": reply["error"]}, status_code=reply["status"])
        reply["processes"]["http_server"] = {"pid": os.getpid()}
        return ORJSONResponse(reply)

    async def gyges_comm_check(request: Request) -> ORJSONResponse:
        """Debug/admin: all-reduce over the pooled group ``{"ranks": [...]}``."""
        ranks = await _read_ranks(request)
        if isinstance(ranks, ORJSONResponse):
            return ranks
        return await _forward({"op": "comm_check", "ranks": ranks}, timeout_s=60.0)

    async def _read_ranks(request: Request) -> list[Any] | ORJSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            return ORJSONResponse({"error": f"body is not valid JSON: {e}"}, status_code=400)
        if not isinstance(body, dict) or "ranks" not in body:
            return ORJSONResponse({"error": 'body must be a JSON object {"ranks": [...]}'},
                                  status_code=400)
        return body["ranks"]

    async def _transform(op: str, request: Request) -> ORJSONResponse:
        ranks = await _read_ranks(request)
        if isinstance(ranks, ORJSONResponse):
            return ranks
        try:
            reply = await async_request(address, {"op": op, "ranks": ranks}, timeout_s=30.0)
            if not reply.pop("ok"):
                return ORJSONResponse({"error": reply["error"]}, status_code=reply["status"])
            job = reply["job"]
            deadline = time.monotonic() + TRANSFORM_TIMEOUT_S
            while time.monotonic() < deadline:
                reply = await async_request(address, {"op": "job", "job": job, "wait_s": 2.0},
                                            timeout_s=30.0)
                if not reply.pop("ok"):
                    return ORJSONResponse({"error": reply["error"]},
                                          status_code=reply["status"])
                if reply["done"]:
                    return ORJSONResponse(reply["result"])
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

    app.add_api_route("/gyges/status", gyges_status, methods=["GET"])
    app.add_api_route("/gyges/debug/comm_check", gyges_comm_check, methods=["POST"])
    app.add_api_route("/gyges/merge", gyges_merge, methods=["POST"])
    app.add_api_route("/gyges/split", gyges_split, methods=["POST"])
