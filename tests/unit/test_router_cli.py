"""`python -m gyges.router` as a process: starts, routes, reports, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
from router_fakes import FakeWorker, fake_workers, run_async

from gyges.router.__main__ import parse_args

PYTHON_DIR = Path(__file__).resolve().parents[2] / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_parse_args_builds_config():
    cfg = parse_args(
        [
            "--worker-urls",
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "--port",
            "9",
            "--policy",
            "least_load",
            "--health-check-interval-secs",
            "1.5",
        ]
    )
    assert cfg.worker_urls == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert (cfg.port, cfg.policy, cfg.health.interval_s) == (9, "least_load", 1.5)
    with pytest.raises(SystemExit):
        parse_args(["--policy", "random"])


@run_async
async def test_cli_process_routes_and_exits_on_sigterm():
    port = free_port()
    async with fake_workers(FakeWorker("a")) as urls:
        env = dict(
            os.environ, PYTHONPATH=f"{PYTHON_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gyges.router",
            "--worker-urls",
            *urls,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--health-check-interval-secs",
            "0.2",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as s:
                for _ in range(200):
                    try:
                        async with s.get(base + "/workers") as resp:
                            if (await resp.json())["stats"]["healthy_count"] == 1:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
                body = {"text": "abc", "sampling_params": {"max_new_tokens": 2}}
                async with s.post(base + "/generate", json=body) as resp:
                    assert resp.status == 200 and (await resp.json())["text"] == "a0 b1 "
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    assert proc.returncode == 0, err.decode()
    assert b"listening on http://127.0.0.1" in err
