"""CLI: python -m gyges.router --worker-urls URL [URL ...] --host H --port P [--policy P]
[--api-key K] [--admin-api-key A] [--worker-api-key W] [--tokenizer-path PATH]."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web

from gyges.router.app import RouterConfig, build_app
from gyges.router.auth import RouterKeys
from gyges.router.need import TokenizerError, load_tokenizer
from gyges.router.policy import POLICIES
from gyges.router.workers import HealthConfig

logger = logging.getLogger("gyges.router")


def parse_args(argv: Sequence[str] | None = None) -> RouterConfig:
    """Parse the command line into a RouterConfig."""
    p = argparse.ArgumentParser(
        prog="python -m gyges.router",
        description="HTTP router for Gyges (or stock SGLang) servers on several hosts.",
    )
    p.add_argument(
        "--worker-urls",
        nargs="*",
        default=[],
        metavar="URL",
        help="worker base URLs, e.g. http://10.0.0.1:30000 (more via POST /workers)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="gyges",
        help="gyges (status-aware; least-load for stock servers), or a baseline",
    )
    p.add_argument("--health-check-endpoint", default="/health")
    p.add_argument("--health-check-interval-secs", type=float, default=5.0)
    p.add_argument(
        "--health-check-timeout-secs",
        type=float,
        default=20.0,
        help="SGLang's /health runs a one-token generation: allow it time",
    )
    p.add_argument(
        "--health-failure-threshold",
        type=int,
        default=2,
        help="failed checks in a row before a worker is taken out (a request that "
        "cannot connect takes it out at once)",
    )
    p.add_argument(
        "--status-interval-secs",
        type=float,
        default=0.5,
        help="how often each healthy worker's /gyges/status is polled",
    )
    p.add_argument("--connect-timeout-secs", type=float, default=5.0)
    p.add_argument(
        "--request-timeout-secs",
        type=float,
        default=None,
        help="total time limit per proxied request (default: none)",
    )
    p.add_argument(
        "--chars-per-token",
        type=float,
        default=4.0,
        help="prompt-length estimate for text prompts (no tokenizer in the router)",
    )
    p.add_argument("--tokenizer-path", default=None,
                   help="the model's tokenizer (directory or hub id): exact prompt lengths "
                   "instead of --chars-per-token; unloadable is a startup error")
    p.add_argument("--api-key", default=None,
                   help="key clients must present (Authorization: Bearer) on request routes")
    p.add_argument("--admin-api-key", default=None,
                   help="key for /workers changes and the router's /gyges/status (without "
                   "it, --api-key opens them; with neither they are open, as in SGLang)")
    p.add_argument("--worker-api-key", default=None,
                   help="key the router presents to workers on everything it sends them, in "
                   "place of the client's")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    tokenizer = None
    if a.tokenizer_path is not None:
        try:
            tokenizer = load_tokenizer(a.tokenizer_path)
        except TokenizerError as e:
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            sys.exit(2)
    logging.basicConfig(
        level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    health = HealthConfig(
        endpoint=a.health_check_endpoint,
        interval_s=a.health_check_interval_secs,
        timeout_s=a.health_check_timeout_secs,
        failure_threshold=a.health_failure_threshold,
        status_interval_s=a.status_interval_secs,
    )
    return RouterConfig(
        worker_urls=tuple(a.worker_urls),
        host=a.host,
        port=a.port,
        policy=a.policy,
        health=health,
        connect_timeout_s=a.connect_timeout_secs,
        request_timeout_s=a.request_timeout_secs,
        chars_per_token=a.chars_per_token,
        keys=RouterKeys(a.api_key, a.admin_api_key, a.worker_api_key),
        tokenizer=tokenizer,
    )


async def serve(config: RouterConfig) -> None:
    """Run the router until SIGINT or SIGTERM."""
    runner = web.AppRunner(build_app(config), access_log=None)
    await runner.setup()
    if not (config.keys.admin_api_key or config.keys.api_key) and config.host not in (
            "127.0.0.1", "localhost", "::1"):
        logger.warning("no --admin-api-key: anyone who reaches %s:%d can register workers "
                       "(and receive prompts)", config.host, config.port)
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    logger.info(
        "gyges router (%s policy) listening on http://%s:%d",
        config.policy,
        config.host,
        config.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
