"""`/gyges/status` of the workers: parse, fetch, and the router's aggregate view."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from gyges.router.policy import HostStatus, InstanceStatus

if TYPE_CHECKING:
    from gyges.router.workers import Worker, WorkerRegistry

STATUS_PATH = "/gyges/status"


class StatusFormatError(ValueError):
    """A worker's /gyges/status body does not follow the contract."""


def parse_host_status(obj: Any) -> HostStatus:
    """Validate and convert a `/gyges/status` JSON object; raises StatusFormatError."""
    try:
        instances = tuple(
            InstanceStatus(
                ranks=tuple(int(r) for r in inst["ranks"]),
                tp=int(inst["tp"]),
                leader=int(inst["leader"]),
                capacity_tokens=int(inst["capacity_tokens"]),
                used_tokens=int(inst["used_tokens"]),
                running=int(inst["running"]),
                waiting=int(inst["waiting"]),
            )
            for inst in obj["instances"]
        )
        return HostStatus(
            kv_layout=str(obj["kv_layout"]),
            mlp_storage=str(obj["mlp_storage"]),
            max_tp=int(obj["max_tp"]),
            dp_size=int(obj["dp_size"]),
            max_request_tokens=int(obj["max_request_tokens"]),
            instances=instances,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise StatusFormatError(f"malformed {STATUS_PATH}: {e!r}") from e


async def fetch_host_status(
    session: aiohttp.ClientSession, url: str, timeout_s: float,
    headers: dict[str, str] | None = None,
) -> tuple[HostStatus | None, Any]:
    """GET url/gyges/status -> (parsed status, raw JSON); (None, None) for a stock server (404).

    Raises aiohttp.ClientError / asyncio.TimeoutError when the worker cannot be reached and
    StatusFormatError when the body is not a valid status.
    """
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.get(url + STATUS_PATH, timeout=timeout, headers=headers) as resp:
        if resp.status == 404:
            return None, None
        if resp.status == 401:
            raise StatusFormatError(f"{STATUS_PATH} answered HTTP 401: the worker has keys; "
                                    "start the router with --worker-api-key")
        if resp.status != 200:
            raise StatusFormatError(f"{STATUS_PATH} answered HTTP {resp.status}")
        try:
            raw = await resp.json(content_type=None)
        except ValueError as e:
            raise StatusFormatError(f"{STATUS_PATH} is not JSON: {e}") from e
    return parse_host_status(raw), raw


async def refresh_status(session: aiohttp.ClientSession, worker: Worker, timeout_s: float,
                         headers: dict[str, str] | None = None) -> None:
    """Fetch one worker's status; on failure keep the previous snapshot and note the error."""
    sent_at = time.monotonic()
    try:
        status, raw = await fetch_host_status(session, worker.url, timeout_s, headers)
    except (aiohttp.ClientError, asyncio.TimeoutError, StatusFormatError) as e:
        worker.status_error = f"{type(e).__name__}: {e}"
        return
    worker.set_status(status, raw, sent_at)


def aggregate(registry: WorkerRegistry, policy: str) -> dict[str, Any]:
    """The router's `/gyges/status`: each worker's snapshot and routing counters, plus totals."""
    now = time.monotonic()
    workers = [w.describe(now) for w in registry.workers()]
    statuses = [w.status for w in registry.workers() if w.healthy and w.status is not None]
    instances = [i for s in statuses for i in s.instances]
    totals = {
        "workers": len(workers),
        "healthy_workers": sum(1 for w in registry.workers() if w.healthy),
        "gyges_workers": len(statuses),
        "instances": len(instances),
        "merged_instances": sum(1 for i in instances if i.tp > 1),
        "capacity_tokens": sum(i.capacity_tokens for i in instances),
        "used_tokens": sum(i.used_tokens for i in instances),
        "running": sum(i.running for i in instances),
        "waiting": sum(i.waiting for i in instances),
        "routed_short": sum(w.routed_short for w in registry.workers()),
        "routed_long": sum(w.routed_long for w in registry.workers()),
        "max_request_tokens": max((s.max_request_tokens for s in statuses), default=0),
    }
    return {"policy": policy, "workers": workers, "totals": totals}
