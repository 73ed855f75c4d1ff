"""The router's keys, with the semantics of SGLang's own ``--api-key`` / ``--admin-api-key``.

- Client routes (generation, models, model info) are NORMAL: with ``--api-key`` that key is
  required (the admin key does not open them), otherwise they are open.
- The router's admin routes (``/workers`` and the router's ``/gyges/status``, which lists
  the workers) are ADMIN_OPTIONAL: with ``--admin-api-key`` only that key works; with only
  ``--api-key`` that key works; with neither they are open.
- ``/health*`` and ``/metrics`` are always open (probes and Prometheus scrapes).

``--worker-api-key`` is what the router presents to workers on everything it sends them, in
place of the client's ``Authorization`` header.
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import Enum

from aiohttp import web
from aiohttp.typedefs import Handler


class AuthLevel(Enum):
    OPEN = "open"
    NORMAL = "normal"
    ADMIN_OPTIONAL = "admin_optional"


ADMIN_PATHS = ("/workers", "/gyges/status")
OPEN_PATHS = ("/health", "/metrics")


@dataclass(frozen=True)
class RouterKeys:
    """Keys the router checks (``api_key``, ``admin_api_key``) and presents (``worker``)."""

    api_key: str | None = None
    admin_api_key: str | None = None
    worker_api_key: str | None = None

    def worker_headers(self) -> dict[str, str]:
        """Headers for the router's own calls to workers (health checks, status polls)."""
        return {"Authorization": f"Bearer {self.worker_api_key}"} if self.worker_api_key else {}

    def forward_authorization(self, client_header: str | None) -> str | None:
        """The ``Authorization`` a proxied request carries to its worker: the worker key if
        set; none if the router has keys of its own (the client's key is the router's, not
        the workers'); else the client's header, unchanged."""
        if self.worker_api_key:
            return f"Bearer {self.worker_api_key}"
        if self.api_key or self.admin_api_key:
            return None
        return client_header


def level_of(path: str) -> AuthLevel:
    if path.startswith(OPEN_PATHS):
        return AuthLevel.OPEN
    if any(path == p or path.startswith(p + "/") for p in ADMIN_PATHS):
        return AuthLevel.ADMIN_OPTIONAL
    return AuthLevel.NORMAL


def allowed(level: AuthLevel, header: str | None, keys: RouterKeys) -> bool:
    """SGLang's decision for NORMAL and ADMIN_OPTIONAL routes (``sglang.srt.utils.auth``)."""
    if level is AuthLevel.OPEN:
        return True
    if level is AuthLevel.ADMIN_OPTIONAL and keys.admin_api_key:
        return _bearer_is(header, keys.admin_api_key)
    if keys.api_key:
        return _bearer_is(header, keys.api_key)
    return True


def _bearer_is(header: str | None, key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), key.encode())


def auth_middleware(keys: RouterKeys) -> Handler:
    """aiohttp middleware answering 401 (JSON error) to requests without the right key."""

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" and not allowed(
                level_of(request.path), request.headers.get("Authorization"), keys):
            body = {"error": {"message": "invalid or missing API key", "type": "unauthorized",
                              "code": 401}}
            return web.json_response(body, status=401)
        return await handler(request)

    return check


