"""Replicas agree on one KV capacity before allocating (``gyges.control.capacity_barrier``)."""
from __future__ import annotations

import multiprocessing as mp

import pytest

from gyges.control.capacity_barrier import CapacityBarrierTimeout, agree_min


def _rank(directory, rank, world, values, out):
    out.put((rank, [agree_min(directory, rank, world, v, round_=i, timeout_s=60)
                    for i, v in enumerate(values)]))


def test_every_rank_gets_the_minimum_of_each_round_and_the_directory_goes(tmp_path):
    directory = tmp_path / "host"
    values = {0: [900, 7], 1: [500, 9], 2: [700, 8]}
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(directory, r, 3, v, out)) for r, v in values.items()]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert got == {r: [500, 7] for r in values}
    assert not directory.exists()


def test_a_missing_rank_times_out_naming_it(tmp_path):
    with pytest.raises(CapacityBarrierTimeout, match=r"replicas \[1\]"):
        agree_min(tmp_path / "host", 0, 2, 100, timeout_s=0.3)
