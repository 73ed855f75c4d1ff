"""A small request/reply channel over zmq, engine-agnostic.

The host controller binds a ROUTER socket at :func:`control_address`; every other
process (HTTP server, schedulers) talks to it with JSON messages ``{"op": ..., ...}``
and gets one JSON reply per request. Replies carry ``"ok": true`` or
``"ok": false, "error": str, "status": int`` (an HTTP-style code for the front end).
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

logger = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], Message]


def control_address(tokenizer_ipc_name: str) -> str:
    """Address of the host controller, derived from an IPC name every SGLang process shares."""
    if not tokenizer_ipc_name.startswith("ipc://"):
        raise ValueError(
            f"Gyges needs a single-node deployment with IPC sockets (got {tokenizer_ipc_name!r})"
        )
    return tokenizer_ipc_name + "-gyges-ctl"


class ControlError(Exception):
    """A request the controller refused; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ControlServer:
    """ROUTER socket served by a daemon thread; ``handlers[op](msg)`` returns the reply.

    Handlers run on the server thread, one at a time; they may raise :class:`ControlError`.
    A handler must not wait for long: every process's messages (health probes included)
    queue behind it.
    """

    def __init__(self, address: str, handlers: dict[str, Handler]) -> None:
        self.address = address
        self.handlers = handlers
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind(address)
        self._thread = threading.Thread(target=self._serve, name="gyges-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            frames = self._sock.recv_multipart()
            ident, payload = frames[0], frames[-1]
            reply = self._handle(payload)
            self._sock.send_multipart([ident, b"", json.dumps(reply).encode()])

    def _handle(self, payload: bytes) -> Message:
        try:
            msg = json.loads(payload)
            if not isinstance(msg, dict) or "op" not in msg:
                raise ControlError("control message must be a JSON object with an 'op'")
            handler = self.handlers.get(msg["op"])
            if handler is None:
                raise ControlError(f"unknown control op {msg['op']!r}", 404)
            return {"ok": True, **handler(msg)}
        except ControlError as e:
            return {"ok": False, "error": str(e), "status": e.status}
        except Exception as e:  # a bug must not kill the control thread
            logger.exception("gyges control handler failed")
            return {"ok": False, "error": f"internal error: {e}", "status": 500}


def request(address: str, msg: Message, timeout_s: float = 30.0) -> Message:
    """Blocking request from any process (schedulers use this)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(address)
        sock.send(json.dumps(msg).encode())
        return json.loads(sock.recv())
    except zmq.Again as e:
        raise TimeoutError(f"gyges controller did not answer {msg.get('op')!r}") from e
    finally:
        sock.close()


async def async_request(address: str, msg: Message, timeout_s: float = 30.0) -> Message:
    """Non-blocking request for the HTTP server's event loop."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(address)
        await sock.send(json.dumps(msg).encode())
        if not await sock.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"gyges controller did not answer {msg.get('op')!r}")
        return json.loads(await sock.recv())
    finally:
        sock.close()
