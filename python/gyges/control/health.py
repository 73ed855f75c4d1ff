"""Whether this host may serve, and taking it out of service; engine-agnostic.

A host goes out of service when a transformation failed after commit (a member's state is
lost) or a scheduler process died. From then on ``/health`` answers 503 (the HTTP hook
asks :meth:`HostHealth.reason` through the control channel), dispatch is paused on every
rank, no transformation starts, and after a grace period (in-flight requests on healthy
instances may finish, and failed members abort theirs) the host exits non-zero through
``exit_host`` (SIGKILL of the server's processes), so a router or supervisor routes
around it and restarts it.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)


def exit_grace_s() -> float:
    return float(os.environ.get("GYGES_EXIT_GRACE_S", "15"))


class HostHealth:
    """The first failure wins; later ones are logged. Thread-safe."""

    def __init__(self, *, pause_all: Callable[[], None], exit_host: Callable[[], None],
                 grace_s: float | None = None) -> None:
        self._pause_all, self._exit_host = pause_all, exit_host
        self.grace_s = exit_grace_s() if grace_s is None else grace_s
        self._lock = threading.Lock()
        self._reason: str | None = None
        self.since: float | None = None

    def reason(self) -> str | None:
        """Why the host is out of service (None: it serves)."""
        with self._lock:
            return self._reason

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._reason is not None:
                logger.error("Gyges: another failure while out of service: %s", reason)
                return
            self._reason, self.since = reason, time.time()
        logger.error("Gyges: host out of service, exiting in %.0fs: %s", self.grace_s, reason)
        try:
            self._pause_all()
        finally:
            threading.Thread(target=self._exit_later, name="gyges-exit", daemon=True).start()

    def _exit_later(self) -> None:
        time.sleep(self.grace_s)
        logger.error("Gyges: exiting: %s", self._reason)
        self._exit_host()


def watch_schedulers(alive: Callable[[], Mapping[int, tuple[int, int | None]]],
                     health: HostHealth, interval_s: float = 0.5) -> threading.Thread:
    """Poll ``alive()`` ({rank: (pid, exit code or None while running)}) and fail the host
    as soon as a scheduler process has exited: a dead scheduler must never sit behind a
    healthy ``/health``."""

    def run() -> None:
        while health.reason() is None:
            for rank, (pid, code) in sorted(alive().items()):
                if code is not None:
                    health.fail(f"the scheduler of rank {rank} (pid {pid}) exited with "
                                f"code {code}")
                    return
            time.sleep(interval_s)

    thread = threading.Thread(target=run, name="gyges-watchdog", daemon=True)
    thread.start()
    return thread
