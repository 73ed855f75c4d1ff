"""Every replica of a Gyges host gets the same number of KV slots.

Merged views reinterpret each member's ``[H, S, D]`` storage, so every replica of a host must
have the same S. SGLang sizes each data-parallel replica's pool from the memory it sees
when it profiles, and replicas that profile while another one allocates see less (measured
on the 2-core VM without ``--max-total-tokens``: 991946 and 765909 slots). So the replicas
agree on the smallest profiled count before any pool is allocated, through small files
in one directory (no communicator exists yet at that point): each writes its count, waits
(bounded) for all, and takes the minimum. Engine-agnostic; the SGLang seam is
:mod:`gyges.hooks.kv_cache_configurator`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path


class CapacityBarrierTimeout(RuntimeError):
    """Not every replica reported its KV capacity in time."""


def barrier_dir(key: str) -> Path:
    """The directory one host's replicas share (``key`` names the host's launch)."""
    return Path(tempfile.gettempdir()) / f"gyges-capacity-{key}"


def agree_min(directory: Path, rank: int, world: int, value: int, round_: int = 0,
              timeout_s: float = 600.0, poll_s: float = 0.05) -> int:
    """Publish ``value`` for ``rank`` and return the minimum over all ``world`` ranks'
    values of round ``round_``; raises :class:`CapacityBarrierTimeout` after ``timeout_s``.
    Each round has its own subdirectory; the last rank to finish a round removes it."""
    parent, directory = directory, directory / f"round-{round_}"
    directory.mkdir(parents=True, exist_ok=True)
    _publish(directory / f"value-{round_}-{rank}", str(int(value)))
    deadline = time.monotonic() + timeout_s
    values: dict[int, int] = {}
    while len(values) < world:
        for r in range(world):
            if r not in values:
                path = directory / f"value-{round_}-{r}"
                if path.exists():
                    values[r] = int(path.read_text())
        if len(values) < world:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(values))
                raise CapacityBarrierTimeout(
                    f"gyges: replicas {missing} did not report their KV capacity within "
                    f"{timeout_s:.0f} s (every replica of a host must size its KV pool alike)")
            time.sleep(poll_s)
    _publish(directory / f"done-{round_}-{rank}", "")
    if all((directory / f"done-{round_}-{r}").exists() for r in range(world)):
        shutil.rmtree(directory, ignore_errors=True)
        try:
            parent.rmdir()  # only once no other round is in progress
        except OSError:
            pass
    return min(values.values())


def _publish(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
