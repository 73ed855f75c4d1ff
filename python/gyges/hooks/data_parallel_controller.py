"""Hook on ``sglang.srt.managers.data_parallel_controller.DataParallelController``.

Under ``--enable-gyges`` the controller process hosts the :class:`HostController`, serves
the control channel, binds the command socket to the schedulers and hosts the TCPStore
master of the communicator pool (on a free loopback port, told to schedulers in the
hello reply).
"""
from __future__ import annotations

import logging
from typing import Any

from gyges.comm.pool import start_store
from gyges.control.channel import ControlServer, control_address
from gyges.control.commands import CommandBus, command_address
from gyges.hooks.server_args import gyges_config
from gyges.host_controller import HostController, RankLoad

TARGET = "sglang.srt.managers.data_parallel_controller.DataParallelController"
logger = logging.getLogger(__name__)


def after_init_dispatcher(_result: None, controller: Any) -> None:
    config = gyges_config(controller.server_args)
    if config is None:
        return
    ipc_name = controller.port_args.tokenizer_ipc_name
    store = start_store()
    commands = CommandBus(command_address(ipc_name))
    host = HostController(config, lambda: _read_loads(controller), commands=commands,
                          store_port=store.port)
    server = ControlServer(control_address(ipc_name), host.handlers())
    server.start()
    controller._gyges_host = host
    controller._gyges_control = server
    controller._gyges_pool_store = store  # keep the store master alive
    logger.info("Gyges host controller serving at %s (max TP %d, policy %s, pool store "
                "port %d)", server.address, config.max_tp, config.policy, store.port)


def _read_loads(controller: Any) -> dict[int, RankLoad]:
    loads: dict[int, RankLoad] = {}
    for snap in controller.load_snapshot_reader.read_all():
        if snap is None:
            continue
        loads[snap.dp_rank] = RankLoad(running=snap.num_running_reqs,
                                       waiting=snap.num_waiting_reqs,
                                       used_tokens=snap.num_used_tokens)
    return loads
