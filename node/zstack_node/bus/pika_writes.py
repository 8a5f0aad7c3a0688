"""Batched, prompt socket writes for pika's asyncio adapter.

pika's transport sends only after a writability event: every publish costs an event-loop pass
and two epoll_ctl calls, and each frame (method, header, body) is its own send(). Here a write
schedules one flush for the end of the current loop pass instead, and the flush sends everything
buffered by then with a single send(): a call's request goes out as one syscall, and a burst of
publishes shares one. The writability watcher is used only when the socket is full.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from pika.adapters.utils import io_services_utils as io_utils

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
    # These are pika internals (pinned to pika 1.x): if a release renames them, keep pika's own path.
    if type(transport) is Transport and all(hasattr(transport, name) for name in _NEEDED):
        transport.write = types.MethodType(_write, transport)
