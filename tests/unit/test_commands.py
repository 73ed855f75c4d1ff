"""CommandBus <-> CommandClient in one process, and the controller's comm_check op."""
from __future__ import annotations

import os
import tempfile
import threading
import time

import pytest

from gyges.comm.pool import expected_sum
from gyges.config import GygesConfig
from gyges.control.channel import ControlError
from gyges.control.commands import CommandBus, CommandClient, command_address
from gyges.host_controller import HostController


@pytest.fixture
def address():
    name = "ipc://" + os.path.join(tempfile.mkdtemp(), "tok")
    return command_address(name)


def serve(clients, stop):
    """The schedulers' loop: one non-blocking poll per iteration."""
    while not stop.is_set():
        for c in clients:
            c.poll()
        time.sleep(0.001)


@pytest.fixture
def bus_and_clients(address):
    bus = CommandBus(address)
    clients = [CommandClient(address, r, {"echo": lambda m, r=r: {"got": m["x"] * 10 + r},
                                          "boom": lambda m: 1 / 0})
               for r in range(2)]
    stop = threading.Event()
    t = threading.Thread(target=serve, args=(clients, stop), daemon=True)
    time.sleep(0.1)  # let the DEALERs connect
    t.start()
    yield bus, clients
    stop.set()
    t.join()
    for c in clients:
        c.close()
    bus.close()


def test_run_collects_one_reply_per_rank(bus_and_clients):
    bus, _ = bus_and_clients
    replies = bus.run([0, 1], {"op": "echo", "x": 4}, timeout_s=5)
    assert {r: (m["ok"], m["got"], m["rank"]) for r, m in replies.items()} == {
        0: (True, 40, 0), 1: (True, 41, 1)}
    assert bus.run([1], {"op": "echo", "x": 1}, timeout_s=5)[1]["got"] == 11


def test_failures_are_replies_or_control_errors(bus_and_clients):
    bus, _ = bus_and_clients
    boom = bus.run([0], {"op": "boom"}, timeout_s=5)[0]
    assert not boom["ok"] and "ZeroDivisionError" in boom["error"]
    assert "unknown command" in bus.run([1], {"op": "nope"}, timeout_s=5)[1]["error"]
    with pytest.raises(ControlError) as e:
        bus.run([0, 7], {"op": "echo", "x": 0}, timeout_s=5)
    assert e.value.status == 503 and "rank 7" in str(e.value)
    # rank 0 got that command anyway: its late reply is dropped by the next run
    assert bus.run([0, 1], {"op": "echo", "x": 2}, timeout_s=5)[0]["got"] == 20


def test_timeout_then_late_reply_is_dropped(address):
    bus = CommandBus(address)
    client = CommandClient(address, 0, {"echo": lambda m: {"got": m["x"]}})
    time.sleep(0.1)
    with pytest.raises(ControlError) as e:
        bus.run([0], {"op": "echo", "x": 1}, timeout_s=0.2)  # nobody polls
    assert e.value.status == 504 and "[0]" in str(e.value)
    assert client.poll() == 1  # answers the stale command
    done = threading.Timer(0.1, client.poll)
    done.start()
    assert bus.run([0], {"op": "echo", "x": 2}, timeout_s=5)[0]["got"] == 2
    done.join()
    client.close()
    bus.close()


class FakeBus:
    def __init__(self):
        self.sent = []

    def run(self, ranks, msg, timeout_s):
        self.sent.append((tuple(ranks), msg))
        return {r: {"id": 1, "rank": r, "ok": True, "result": expected_sum(tuple(ranks)),
                    "elapsed_ms": 1.0} for r in ranks}


def make_host(bus):
    cfg = GygesConfig.build(enabled=True, tp_size=1, dp_size=4, max_tp=4, policy="gyges",
                            num_kv_heads=4)
    return HostController(cfg, lambda: {}, commands=bus, store_port=1234)


def test_comm_check_validates_then_needs_ready_pools():
    bus = FakeBus()
    host = make_host(bus)
    h = host.handlers()
    with pytest.raises(ControlError, match="not an aligned group"):
        h["comm_check"]({"op": "comm_check", "ranks": [1, 2]})
    with pytest.raises(ControlError) as e:
        h["comm_check"]({"op": "comm_check", "ranks": [0, 1]})
    assert e.value.status == 503 and "not ready" in str(e.value)
    for r in range(4):
        h["pool_ready"]({"op": "pool_ready", "rank": r, "build_ms": 5.0 + r})
    out = h["comm_check"]({"op": "comm_check", "ranks": [3, 2]})
    assert out["ranks"] == [2, 3] and out["passed"] and out["expected"] == [2.0, 5.0, 12.0]
    assert [x["rank"] for x in out["results"]] == [2, 3] and bus.sent[0][0] == (2, 3)
    st = host.status()["comm_pool"]
    assert st == {"ready_ranks": [0, 1, 2, 3],
                  "build_ms": {"0": 5.0, "1": 6.0, "2": 7.0, "3": 8.0}}


def test_hello_reply_tells_the_pool_store():
    host = make_host(FakeBus())
    reply = host.handlers()["hello"]({"op": "hello", "rank": 2, "pid": 1, "kv_layout": "x",
                                      "mlp_storage": "y", "capacity_tokens": 10})
    assert reply == {"pool": {"store_port": 1234, "world_size": 4, "max_tp": 4}}
