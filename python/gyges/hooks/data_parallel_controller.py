"""Hook on ``sglang.srt.managers.data_parallel_controller.DataParallelController``.

Under ``--enable-gyges`` the controller process hosts the :class:`HostController`, serves
the control channel, binds the command socket to the schedulers and hosts the TCPStore
master of the communicator pool (on a free loopback port, told to schedulers in the
hello reply).

Requests are placed by the :class:`TransformationScheduler` (``--gyges-policy``): each
generate/embedding request's need (prompt + max_new_tokens) decides its instance, and
the scheduler merges and splits groups on its own thread. The chosen leader is applied
as SGLang's ``routed_dp_rank``, so SGLang's own dispatch path sends it. Health checks
and requests a client pinned to a DP rank bypass the policy.

Dispatch goes through a :class:`DispatchGate` (AROUND hooks on ``dispatching_with_trace``
and ``send_control_message``): requests for ranks under transformation are routed to other
instances or held, and followers of merged instances receive nothing (SGLang's ``status``
flags + ``_refresh_active_workers``). The gate's lock serialises the control thread's
changes, and its sends of held work, with the main thread's dispatch; the scheduler uses
the same lock.

The controller's ``event_loop`` blocks in a socket poll instead of SGLang's busy poll, so
the process leaves the CPU (and the GIL) to the schedulers and the Gyges threads.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from gyges.comm.pool import start_store
from gyges.control.channel import ControlServer, Message, control_address
from gyges.control.commands import CommandBus, command_address
from gyges.control.dispatch_gate import NEVER_HELD, DispatchGate
from gyges.control.health import HostHealth, watch_schedulers
from gyges.control.metrics import PrometheusMetrics
from gyges.control.scheduler import TransformationScheduler
from gyges.core.request_limits import request_need
from gyges.hooks.scheduler import HELD_ABORT_MARK
from gyges.hooks.server_args import gyges_config
from gyges.host_controller import HostController, RankLoad
from gyges.topology import Topology

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
    health = HostHealth(pause_all=lambda: routing.pause(tuple(range(config.dp_size))),
                        exit_host=_exit_host)
    host.health = health
    if host.transformer is not None:
        host.transformer.on_fatal, host.transformer.stop = health.fail, health.reason
    watch_schedulers(lambda: _scheduler_procs(controller, host), health)
    server = ControlServer(control_address(ipc_name), host.handlers())
    server.start()
    controller._gyges_host = host
    controller._gyges_control = server
    controller._gyges_pool_store = store  # keep the store master alive
    controller._gyges_scheduler = None
    if routing.unsupported:
        host.scheduler_off_reason = routing.unsupported
        logger.warning("Gyges: dispatch policy off: %s", routing.unsupported)
    else:
        metrics = PrometheusMetrics() if controller.server_args.enable_metrics else None
        scheduler = TransformationScheduler(
            config, DpSchedulerHost(controller, host, gate), gate.lock,
            page_size=int(controller.server_args.page_size or 1), metrics=metrics)
        host.scheduler = controller._gyges_scheduler = scheduler
        scheduler.start()
    logger.info("Gyges host controller serving at %s (max TP %d, policy %s, pool store "
                "port %d)", server.address, config.max_tp, config.policy, store.port)


def _scheduler_procs(controller: Any, host: HostController) -> dict[int, tuple[int, int | None]]:
    """{rank: (pid, exit code or None)} of the registered scheduler processes this
    controller launched (``exitcode`` also reaps them: no zombies)."""
    pids = host.scheduler_pids()
    out = {}
    for proc in getattr(controller, "scheduler_procs", ()):
        if proc is not None and proc.pid in pids:
            out[pids[proc.pid]] = (proc.pid, proc.exitcode)
    return out


def _exit_host() -> None:
    """Take the whole server down at once: SIGKILL to every other process of the server
    (the launcher and all its descendants), then exit non-zero. Not SIGQUIT to the
    launcher: SGLang's crash handler then spends over a minute on crash diagnostics
    (py-spy, CUDA core dumps) before it exits."""
    import os

    import psutil

    me = psutil.Process()
    launcher = me.parent()
    top = launcher if launcher is not None and launcher.pid > 1 else me
    for proc in top.children(recursive=True):
        if proc.pid != me.pid:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    if top is not me:
        try:
            top.kill()
        except psutil.NoSuchProcess:
            pass
    os._exit(1)


class DpSchedulerHost:
    """The :class:`SchedulerHost` of SGLang's DP controller process."""

    def __init__(self, controller: Any, host: HostController, gate: DispatchGate) -> None:
        self.controller, self.host, self.gate = controller, host, gate

    def topology(self) -> Topology:
        return self.host.topology

    def loads(self) -> Mapping[int, RankLoad]:
        return _read_loads(self.controller)

    def rank_capacity(self) -> int | None:
        return self.host.rank_capacity()

    def paused(self) -> frozenset[int]:
        return self.gate.paused

    def start(self, op: str, ranks: tuple[int, ...]) -> int:
        return self.host.start_transformation(op, ranks)

    def poll(self, job: int) -> Message | None:
        return self.host.poll_transformation(job)

    def hold(self, fn: Callable[[], None]) -> bool:
        with self.gate.lock:
            if not self.gate.must_hold_request(None):
                return False
            self.gate.hold(fn, ())
            return True

    def abort(self, leader: int, rid: str) -> None:
        """``rid`` is sent next (by the scheduler's ``_dispatch``): mark it aborted."""
        with self.gate.lock:
            _aborted_rids(self.controller).add(rid)


def around_dispatching_with_trace(original: Callable[..., Any], controller: Any, req: Any,
                                  *args: Any, **kwargs: Any) -> Any:
    gate: DispatchGate | None = getattr(controller, "_gyges_gate", None)
    if gate is None:
        return original(controller, req, *args, **kwargs)
    with gate.lock:
        pinned = getattr(req, "routed_dp_rank", None)
        scheduler: TransformationScheduler | None = controller._gyges_scheduler
        if (pinned is None and scheduler is not None and scheduler.ready
                and not _is_health_check(req)):
            scheduler.submit(str(req.rid), need_of(req), lambda leader: _send(
                controller, original, req, args, kwargs, leader))
            return None
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
            scheduler: TransformationScheduler | None = controller._gyges_scheduler
            if scheduler is not None and type(obj).__name__ == "AbortReq":
                scheduler.abort(str(obj.rid), bool(obj.abort_all))
            return None
        if gate.must_hold_control():
            gate.hold(original, (controller, obj))
            return None
        return original(controller, obj)


def _send(controller: Any, original: Callable[..., Any], req: Any, args: tuple[Any, ...],
          kwargs: dict[str, Any], leader: int) -> None:
    """Send ``req`` to the instance led by ``leader`` through SGLang's dispatch; if that
    instance is under transformation, hold it in the gate and re-route it when released
    (the leader may have become a follower meanwhile)."""
    gate: DispatchGate = controller._gyges_gate
    with gate.lock:
        target = gate.route_to(leader)
        if gate.must_hold_request(target):
            gate.hold(_send, (controller, original, req, args, kwargs, leader))
            return
        req.routed_dp_rank = target
        aborted = str(req.rid) in _aborted_rids(controller)
        if aborted:  # its scheduler ends it on arrival, before any step (hooks/scheduler)
            _aborted_rids(controller).discard(str(req.rid))
            req.routing_key = HELD_ABORT_MARK
        original(controller, req, *args, **kwargs)
        if aborted:  # and SGLang's own abort after it, should the mark be missed
            from sglang.srt.managers.io_struct import AbortReq, sock_send

            sock_send(controller.workers[target], AbortReq(rid=req.rid))


def _aborted_rids(controller: Any) -> set[str]:
    """Held requests whose clients aborted them, until they are sent (gate lock held)."""
    if not hasattr(controller, "_gyges_aborted_rids"):
        controller._gyges_aborted_rids = set()
    return controller._gyges_aborted_rids


def need_of(req: Any) -> int:
    """KV slots a TokenizedGenerateReqInput/TokenizedEmbeddingReqInput holds at its end:
    ``len(input_ids)`` + ``sampling_params.max_new_tokens`` (SamplingParams defaults it to
    128; None, as OpenAI requests without max_tokens send, counts as 128 too)."""
    ids = getattr(req, "input_ids", None)
    if ids is None:
        ids = getattr(req, "input_embeds", None) or ()
    if "Embedding" in type(req).__name__:
        return request_need(len(ids), 0)
    params = getattr(req, "sampling_params", None)
    return request_need(len(ids), getattr(params, "max_new_tokens", None))


def _is_health_check(req: Any) -> bool:
    from sglang.srt.managers.utils import is_health_check_generate_req

    return is_health_check_generate_req(req)


# The longest the controller sleeps in its socket poll: it feeds SGLang's soft watchdog at
# least this often.
IDLE_POLL_MS = 100


def around_event_loop(original: Callable[..., Any], controller: Any) -> Any:
    """Under Gyges the controller waits on its socket instead of spinning.

    SGLang's loop polls the tokenizer socket with ``NOBLOCK`` in a tight loop: a whole core,
    and the GIL, taken from the schedulers and from the Gyges scheduler and transformer
    threads in this process (on a small host every scheduler loses steps to it). This loop
    does the same work (feed the watchdog, drain the socket, dispatch each request) but
    blocks in ``zmq.Poller.poll`` between messages, so dispatch latency is unchanged.
    """
    if getattr(controller, "_gyges_gate", None) is None:
        return original(controller)
    import zmq
    from sglang.srt.managers.data_parallel_controller import sock_recv

    sock = controller.recv_from_tokenizer
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        controller.soft_watchdog.feed()
        poller.poll(IDLE_POLL_MS)
        while True:
            controller.soft_watchdog.feed()
            try:
                recv_req = sock_recv(sock, flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                break
            controller._request_dispatcher(recv_req)


AROUND_HOOKS = {"dispatching_with_trace": around_dispatching_with_trace,
                "send_control_message": around_send_control_message,
                "event_loop": around_event_loop}


def _read_loads(controller: Any) -> dict[int, RankLoad]:
    loads: dict[int, RankLoad] = {}
    for snap in controller.load_snapshot_reader.read_all():
        if snap is None:
            continue
        loads[snap.dp_rank] = RankLoad(running=snap.num_running_reqs,
                                       waiting=snap.num_waiting_reqs,
                                       used_tokens=snap.num_used_tokens,
                                       total_tokens=snap.num_total_tokens,
                                       timestamp=snap.timestamp)
    return loads
