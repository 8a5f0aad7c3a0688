"""Batched, prompt socket writes for pika's asyncio adapter: the bus's one patch of pika internals.

Why: pika's transport sends only after a writability event, so every publish costs an event-loop pass
and two epoll_ctl calls, and each frame (method, header, body) is its own send(). pika has no public
hook for this. Here a write schedules one flush for the end of the current loop pass instead, and the
flush sends everything buffered by then with a single send(): a call's request goes out as one syscall,
and a burst of publishes shares one. The writability watcher is used only when the socket is full.
`zstack-bench bus --no-pika-writes` measures the bus without it (figures in README.md).

The patch stays behind `install()`. pyproject.toml pins pika to the minor version it was written for,
and tests/node/test_pika_writes.py fails loudly when a pika release changes the internals it needs; in
production such a release would only lose the speed-up (a warning says so), never correctness.
"""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pika
from pika.adapters.utils import io_services_utils as io_utils

log = logging.getLogger(__name__)

Transport = io_utils._AsyncPlaintextTransport


def _write(self: Transport, data: bytes) -> None:
    if self._state != self._STATE_ACTIVE:
        return
    idle = self.get_write_buffer_size() == 0
    self._buffer_tx_data(data)
    if idle:  # otherwise a flush or the writability watcher is already due
        asyncio.get_running_loop().call_soon(_flush, self)


def _flush(self: Transport) -> None:
    if self._state != self._STATE_ACTIVE or not self._tx_buffers:
        return
    if len(self._tx_buffers) > 1:
        joined = b"".join(self._tx_buffers)
        self._tx_buffers.clear()
        self._tx_buffers.append(joined)
    try:
        self._produce()
    except OSError as error:
        if error.errno not in io_utils._TRY_IO_AGAIN_SOCK_ERROR_CODES:
            self._initiate_abort(error)
            return
    if self._tx_buffers:  # the socket is full: let the watcher send the rest
        self._nbio.set_writer(self._sock.fileno(), self._on_socket_writable)


_NEEDED = ("_state", "_STATE_ACTIVE", "_buffer_tx_data", "_produce", "_tx_buffers", "_nbio", "_sock",
           "_on_socket_writable", "_initiate_abort", "get_write_buffer_size")


def install(connection: Any) -> None:
    """Batch the writes of one open asyncio connection. TLS transports keep pika's own path.

    Only this connection's transport changes: other pika connections in the process (a
    BlockingConnection, say) keep pika's behaviour.
    """
    transport = getattr(connection, "_transport", None)
    if type(transport) is not Transport:
        return  # TLS, or not connected
    missing = [name for name in _NEEDED if not hasattr(transport, name)]
    if missing:
        log.warning("pika %s lacks the transport internals %s: bus writes are not batched (slower, still correct)",
                    pika.__version__, ", ".join(missing))
        return
    transport.write = types.MethodType(_write, transport)


def installed(connection: Any) -> bool:
    """True when `connection`'s writes go through the batched path."""
    write = getattr(getattr(connection, "_transport", None), "write", None)
    return getattr(write, "__func__", None) is _write
