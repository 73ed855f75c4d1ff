from __future__ import annotations

import asyncio
import os

import pytest

from gyges.config import GygesConfig
from gyges.control.channel import (
    ControlError,
    ControlServer,
    async_request,
    control_address,
    request,
)
from gyges.host_controller import HostController, RankLoad
from gyges.topology import Topology


def make_host(dp=2, loads=None):
    cfg = GygesConfig.build(enabled=True, tp_size=1, dp_size=dp, max_tp=None, policy="gyges",
                            num_kv_heads=4)
    return HostController(cfg, lambda: loads or {})


def hello(rank, cap=1000):
    return {"op": "hello", "rank": rank, "pid": 100 + rank, "kv_layout": "head_major",
            "mlp_storage": "padded", "capacity_tokens": cap}


def test_boot_status_has_one_tp1_instance_per_rank():
    host = make_host(loads={1: RankLoad(running=2, waiting=1, used_tokens=30)})
    for r in range(2):
        host.handlers()["hello"](hello(r))
    st = host.status()
    assert st["kv_layout"] == "head_major" and st["mlp_storage"] == "padded"
    assert [i["ranks"] for i in st["instances"]] == [[0], [1]]
    assert all(i["tp"] == 1 and i["capacity_tokens"] == 1000 for i in st["instances"])
    assert st["instances"][1] | {} == {"ranks": [1], "tp": 1, "leader": 1,
                                       "capacity_tokens": 1000, "used_tokens": 30,
                                       "running": 2, "waiting": 1}
    assert [s["rank"] for s in st["processes"]["schedulers"]] == [0, 1]


def test_hello_validation():
    host = make_host()
    with pytest.raises(ControlError):
        host.handlers()["hello"](hello(5))
    with pytest.raises(ControlError):
        host.handlers()["hello"]({"op": "hello", "rank": 0})
    host.handlers()["hello"](hello(0))
    with pytest.raises(ControlError, match="rank 1 has 999 KV slots but rank 0 has 1000"):
        host.handlers()["hello"](hello(1, cap=999))


def test_topology_lookup():
    topo = Topology.boot(4)
    assert topo.instance_of(2).ranks == (2,)
    assert topo.leaders == (0, 1, 2, 3)
    with pytest.raises(KeyError):
        topo.instance_of(9)


def test_control_channel_round_trip(tmp_path):
    addr = control_address(f"ipc://{tmp_path}/tok")
    host = make_host()
    ControlServer(addr, host.handlers()).start()
    assert request(addr, hello(0))["ok"]
    bad = request(addr, {"op": "merge-everything"})
    assert bad == {"ok": False, "error": "unknown control op 'merge-everything'", "status": 404}
    st = asyncio.run(async_request(addr, {"op": "status"}))
    assert st["ok"] and st["processes"]["dp_controller"]["pid"] == os.getpid()


def test_control_address_requires_ipc():
    with pytest.raises(ValueError, match="single-node"):
        control_address("tcp://10.0.0.1:5000")


def test_request_times_out_without_controller(tmp_path):
    with pytest.raises(TimeoutError):
        request(f"ipc://{tmp_path}/nobody", {"op": "status"}, timeout_s=0.2)
