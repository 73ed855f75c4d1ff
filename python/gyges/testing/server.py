"""Start and stop real SGLang servers on CPU for tests, demos and benchmarks.

    with SGLangServer(model_dir, dp_size=2, gyges=True) as srv:
        requests.post(srv.url + "/generate", json=...)

``gyges=False`` runs stock SGLang: the plugin is filtered out with ``SGLANG_PLUGINS``, so
no Gyges hook is even registered. Servers run in their own process group and are killed
as a group on exit; their log is kept in a file and quoted when startup fails.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from gyges.testing.tiny_model import TinyModelSpec, write_tiny_model

NO_PLUGINS = "__gyges_disabled__"
CACHE_DIR = Path(os.environ.get("GYGES_CACHE_DIR", Path(__file__).resolve().parents[3]
                                / ".gyges-cache"))


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free TCP port outside the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` is ephemeral, so during a server's slow
    startup gloo's own listeners and outgoing connections may take it before uvicorn binds
    it ("address already in use"). Ports below the ephemeral range are only ever taken by
    an explicit bind.
    """
    low, _ = _ephemeral_range()
    top = max(low - 1, 20001)
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        port = rng.randint(20000, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(spec: TinyModelSpec | None = None, **fields: object) -> Path:
    """A cached tiny checkpoint for ``spec`` (built once per distinct spec)."""
    spec = spec or TinyModelSpec(**fields)  # type: ignore[arg-type]
    key = hashlib.sha256(json.dumps(spec.__dict__, sort_keys=True).encode()).hexdigest()[:12]
    out = CACHE_DIR / "models" / f"{spec.arch}-{key}"
    if not (out / "gyges_tiny_model.json").exists():
        tmp = Path(tempfile.mkdtemp(dir=out.parent if out.parent.exists() else None))
        write_tiny_model(tmp, spec)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            pass
    return out


def cpu_env(num_ranks: int) -> dict[str, str]:
    """Environment for SGLang's CPU engine with ``num_ranks`` scheduler processes.

    SGLang binds each rank's OpenMP threads to its ``SGLANG_CPU_OMP_THREADS_BIND`` cores only
    on AMX or arm64 CPUs; elsewhere it logs "init_cpu_threads_env ... is disabled" and every
    rank runs as many torch threads as the machine has cores. With two ranks on two cores
    that is four spinning OpenMP threads: decode steps then vary 10x (60 to 800 ms) for
    tens of seconds at a time. ``OMP_NUM_THREADS`` (cores / ranks, unless set) prevents it;
    fp32 GEMMs are bitwise equal across thread counts, so outputs do not change."""
    cores = os.cpu_count() or 1
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(str(r % cores) for r in range(num_ranks))
    usable = len(os.sched_getaffinity(0)) or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, usable // max(1, num_ranks))))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class SGLangServer:
    """A real ``python -m sglang.launch_server`` process on CPU (float32, torch_native)."""

    def __init__(self, model: str | Path, *, dp_size: int = 1, tp_size: int = 1,
                 gyges: bool = False, max_total_tokens: int | None = 4096,
                 mem_fraction_static: float = 0.5, extra_args: Sequence[str] = (),
                 startup_timeout_s: float = 600.0, port: int | None = None) -> None:
        self.model = str(model)
        self._port_fixed = port is not None
        self.port = port or free_port()
        self.gyges = gyges
        self._base_args = [
            sys.executable, "-m", "sglang.launch_server", "--model-path", self.model,
            "--device", "cpu", "--attention-backend", "torch_native", "--dtype", "float32",
            "--mem-fraction-static", str(mem_fraction_static),
            *(["--max-total-tokens", str(max_total_tokens)] if max_total_tokens else []),
            "--dp-size", str(dp_size), "--tp-size", str(tp_size),
            "--host", "127.0.0.1", "--skip-server-warmup",
            *(["--enable-gyges"] if gyges else []), *extra_args,
        ]
        self.env = cpu_env(dp_size * tp_size)
        if not gyges:
            self.env["SGLANG_PLUGINS"] = NO_PLUGINS
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(tempfile.mkstemp(prefix="sglang-server-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def args(self) -> list[str]:
        return [*self._base_args, "--port", str(self.port)]

    def start(self, bind_retries: int = 3) -> SGLangServer:
        """Start and wait for /health; a lost race for the port is retried on a new one."""
        for attempt in range(bind_retries + 1):
            try:
                return self._start_once()
            except RuntimeError:
                lost_port = "address already in use" in self.log_path.read_text(errors="replace")
                if self._port_fixed or attempt == bind_retries or not lost_port:
                    raise
                self.stop()
                self.port = free_port()
        raise AssertionError("unreachable")

    def _start_once(self) -> SGLangServer:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout_s}s:\n"
                           f"{self.log_tail()}")

    def stop(self) -> None:
        """Kill the server's whole process group at once. (A SIGTERM makes the schedulers
        exit first; launch_server then takes that for a crash and sleeps 5 s before its
        diagnostics: 6-8 s per server, minutes over the suite, for nothing a test reads.)"""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# SGLang's own CLI parsing with the plugins loaded (as launch_server does), one case per argv.
_PARSE_EACH = """
import json, sys, contextlib, io
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args
load_plugins()
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            sa = prepare_server_args(argv)
            out.append({"code": 0, "attention_backend": sa.attention_backend,
                        "disable_overlap_schedule": sa.disable_overlap_schedule})
        except SystemExit as e:
            out.append({"code": e.code})
    out[-1]["stderr"] = err.getvalue()
print(json.dumps(out))
"""


def parse_server_args(argvs: Sequence[Sequence[str]], timeout_s: float = 300.0) -> list[dict]:
    """Run ``prepare_server_args`` on each argv in one subprocess; per case ``code`` (0:
    accepted, else the exit code), ``stderr`` and, when accepted, the resolved
    ``attention_backend`` and ``disable_overlap_schedule``."""
    proc = subprocess.run([sys.executable, "-c", _PARSE_EACH, json.dumps([list(a) for a in argvs])],
                          env=cpu_env(1), capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"argument parsing crashed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
