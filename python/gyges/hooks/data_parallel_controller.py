"""Hook on ``sglang.srt.managers.data_parallel_controller.DataParallelController``.

Under ``--enable-gyges`` the controller process hosts the :class:`HostController`, serves
the control channel, binds the command socket to the schedulers and hosts the TCPStore
master of the communicator pool (on a free loopback port, told to schedulers in the
hello reply).

Dispatch goes through a :class:`DispatchGate` (AROUND hooks on ``dispatching_with_trace``
and ``send_control_message``): requests for ranks under transformation are routed to other
instances or held, and followers of merged instances receive nothing (SGLang's ``status``
flags + ``_refresh_active_workers``). The gate's lock serialises the control thread's
changes, and its sends of held work, with the main thread's dispatch.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gyges.comm.pool import start_store
from gyges.control.channel import ControlServer, control_address
from gyges.control.commands import CommandBus, command_address
from gyges.control.dispatch_gate import NEVER_HELD, DispatchGate
from gyges.hooks.server_args import gyges_config
from gyges.host_controller import HostController, RankLoad

TARGET = "sglang.srt.managers.data_parallel_controller.DataParallelController"
logger = logging.getLogger(__name__)


class DpRouting:
    """Applies gate changes to SGLang's controller (called from the control thread)."""

    def __init__(self, controller: Any, gate: DispatchGate) -> None:
        self.controller = controller
        self.gate = gate
        from sglang.srt.managers.data_parallel_controller import LoadBalanceMethod

        method = controller.load_balance_method
        self.unsupported = (None if method == LoadBalanceMethod.ROUND_ROBIN else
                            f"merge/split needs --load-balance-method round_robin "
                            f"(this server uses {method.name.lower()})")

    def pause(self, ranks: tuple[int, ...]) -> None:
        with self.gate.lock:
            self.gate.pause(ranks)
            self._apply()

    def resume(self, ranks: tuple[int, ...]) -> int:
        """Un-pause; send held work; return how many held items were sent."""
        with self.gate.lock:
            held = self.gate.resume(ranks)
            self._apply()
            for fn, args in held:
                fn(*args)
        return len(held)

    def set_instance(self, ranks: tuple[int, ...]) -> None:
        with self.gate.lock:
            self.gate.set_instance(ranks)
            self._apply()

    def _apply(self) -> None:
        c = self.controller
        c.status = self.gate.status() + c.status[self.gate.num_ranks:]
        c._refresh_active_workers()


def after_init_dispatcher(_result: None, controller: Any) -> None:
    config = gyges_config(controller.server_args)
    if config is None:
        return
    ipc_name = controller.port_args.tokenizer_ipc_name
    store = start_store()
    commands = CommandBus(command_address(ipc_name))
    controller._gyges_gate = gate = DispatchGate(config.dp_size)
    routing = DpRouting(controller, gate)
    host = HostController(config, lambda: _read_loads(controller), commands=commands,
                          store_port=store.port, routing=routing)
    if controller.server_args.enable_metrics and host.transformer is not None:
        from gyges.control.transform_metrics import TransformMetrics

        host.transformer.observe = TransformMetrics().observe
    server = ControlServer(control_address(ipc_name), host.handlers())
    server.start()
    controller._gyges_host = host
    controller._gyges_control = server
    controller._gyges_pool_store = store  # keep the store master alive
    logger.info("Gyges host controller serving at %s (max TP %d, policy %s, pool store "
                "port %d)", server.address, config.max_tp, config.policy, store.port)


def around_dispatching_with_trace(original: Callable[..., Any], controller: Any, req: Any,
                                  *args: Any, **kwargs: Any) -> Any:
    gate: DispatchGate | None = getattr(controller, "_gyges_gate", None)
    if gate is None:
        return original(controller, req, *args, **kwargs)
    with gate.lock:
        pinned = getattr(req, "routed_dp_rank", None)
        if pinned is not None:
            req.routed_dp_rank = gate.route_to(pinned)
        if gate.must_hold_request(req.routed_dp_rank if pinned is not None else None):
            gate.hold(original, (controller, req, *args))
            return None
        return original(controller, req, *args, **kwargs)


def around_send_control_message(original: Callable[..., Any], controller: Any,
                                obj: Any) -> Any:
    gate: DispatchGate | None = getattr(controller, "_gyges_gate", None)
    if gate is None:
        return original(controller, obj)
    with gate.lock:
        if type(obj).__name__ in NEVER_HELD:
            from sglang.srt.managers.io_struct import sock_send

            for r in gate.control_targets():
                if controller.workers[r] is not None:
                    sock_send(controller.workers[r], obj)
            return None
        if gate.must_hold_control():
            gate.hold(original, (controller, obj))
            return None
        return original(controller, obj)


AROUND_HOOKS = {"dispatching_with_trace": around_dispatching_with_trace,
                "send_control_message": around_send_control_message}


def _read_loads(controller: Any) -> dict[int, RankLoad]:
    loads: dict[int, RankLoad] = {}
    for snap in controller.load_snapshot_reader.read_all():
        if snap is None:
            continue
        loads[snap.dp_rank] = RankLoad(running=snap.num_running_reqs,
                                       waiting=snap.num_waiting_reqs,
                                       used_tokens=snap.num_used_tokens)
    return loads
