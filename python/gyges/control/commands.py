"""Controller -> scheduler commands over zmq, engine-agnostic.

The host controller binds a ROUTER at :func:`command_address`; each scheduler connects a
DEALER whose identity is its rank. :meth:`CommandBus.run` sends one command to a set of
ranks and waits for one reply from each. A scheduler calls :meth:`CommandClient.poll` once
per event-loop iteration: a non-blocking receive, so the serving loop pays one syscall
when no command is pending, and a command runs on the scheduler's own thread between steps.

Every command carries an ``id``; a reply to an older command (one that timed out) is
dropped. The bus is used by one thread at a time (the control thread), which also
serialises commands: ranks never see two collective commands in different orders.
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable

import zmq

from gyges.control.channel import ControlError, Message

logger = logging.getLogger(__name__)

CommandHandler = Callable[[Message], Message]


def command_address(tokenizer_ipc_name: str) -> str:
    """Address of the controller's command socket (next to the control channel's)."""
    if not tokenizer_ipc_name.startswith("ipc://"):
        raise ValueError(f"Gyges needs IPC sockets (got {tokenizer_ipc_name!r})")
    return tokenizer_ipc_name + "-gyges-cmd"


def _identity(rank: int) -> bytes:
    return f"rank{rank}".encode()


class CommandBus:
    """Controller side: ROUTER socket; not thread-safe (use from the control thread)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = zmq.Context.instance().socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown rank -> error, not a drop
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)
        self._ids = itertools.count(1)

    def run(self, ranks: Iterable[int], msg: Message, timeout_s: float,
            stop: Callable[[], str | None] | None = None) -> dict[int, Message]:
        """Send ``msg`` to every rank of ``ranks``; return each rank's reply.

        Raises :class:`ControlError` 503 if a rank has no connected scheduler, 504 if some
        rank does not answer within ``timeout_s``. Stops waiting early, with an error reply
        for each rank still silent, once a reply is ``fatal`` or ``stop()`` (polled every
        half second) names a reason: a failed host need not wait for its dead members.
        """
        ranks = list(ranks)
        cid = next(self._ids)
        payload = json.dumps({**msg, "id": cid}).encode()
        for r in ranks:
            try:
                self._sock.send_multipart([_identity(r), payload])
            except zmq.ZMQError as e:
                raise ControlError(f"rank {r} has no command connection ({e})", 503) from e
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + timeout_s
        while len(replies) < len(ranks):
            failed = next((x["error"] for x in replies.values() if x.get("fatal")), None)
            failed = failed or (stop() if stop is not None else None)
            if failed:
                for r in set(ranks) - set(replies):
                    replies[r] = {"id": cid, "rank": r, "ok": False, "fatal": True,
                                  "error": f"no answer from rank {r}: {failed}"}
                break
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                missing = sorted(set(ranks) - set(replies))
                raise ControlError(f"rank(s) {missing} did not answer {msg.get('op')!r} "
                                   f"within {timeout_s:g}s", 504)
            if not self._sock.poll(min(left_ms, 500)):
                continue
            _ident, data = self._sock.recv_multipart()
            reply = json.loads(data)
            if reply.get("id") != cid:
                logger.warning("gyges: dropping a late command reply %s", reply)
                continue
            replies[int(reply["rank"])] = reply
        return replies

    def close(self) -> None:
        self._sock.close()


class CommandClient:
    """Scheduler side: DEALER socket with identity ``rank<r>``; poll it once per iteration."""

    def __init__(self, address: str, rank: int, handlers: dict[str, CommandHandler]) -> None:
        self.rank = rank
        self.handlers = handlers
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, _identity(rank))
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(address)

    def poll(self) -> int:
        """Run every pending command now, on the caller's thread; never blocks otherwise."""
        msgs = self.receive()
        for msg in msgs:
            self.answer(msg)
        return len(msgs)

    def receive(self) -> list[Message]:
        """Every pending command, without running it (non-blocking)."""
        out = []
        while True:
            try:
                out.append(json.loads(self._sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out

    def answer(self, msg: Message) -> None:
        """Run ``msg`` and send its reply."""
        self._sock.send(json.dumps(self._execute(msg)).encode())

    def take(self, cid: int, timeout_s: float) -> bool:
        """Wait for this rank's own copy of command ``cid`` and consume it.

        Used by a follower of a merged instance, which runs the commands its leader
        relays: the controller sent every member a copy. A different command found first
        was not relayed by the leader; it is answered with an error so the bus does not
        wait for it. Returns False if the copy did not arrive in time.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                logger.warning("gyges: rank %d got no copy of relayed command %s",
                               self.rank, cid)
                return False
            msg = json.loads(self._sock.recv())
            if msg.get("id") == cid:
                return True
            self._sock.send(json.dumps({
                "id": msg.get("id"), "rank": self.rank, "ok": False,
                "error": f"rank {self.rank} is a follower of a merged instance: send "
                         "commands to every rank of the instance"}).encode())

    def _execute(self, msg: Message) -> Message:
        head = {"id": msg.get("id"), "rank": self.rank}
        handler = self.handlers.get(msg.get("op", ""))
        if handler is None:
            return {**head, "ok": False, "error": f"unknown command {msg.get('op')!r}"}
        try:
            return {**head, "ok": True, **handler(msg)}
        except Exception as e:  # the serving loop must survive a failed command
            logger.exception("gyges command %r failed", msg.get("op"))
            reply = {**head, "ok": False, "error": f"{type(e).__name__}: {e}"}
            if getattr(e, "fatal", False):  # a failed transformation: the host must go
                reply["fatal"] = True
            if getattr(e, "broken", False):  # a group whose collective failed pre-commit
                reply["broken"] = True
            return reply

    def close(self) -> None:
        self._sock.close()
