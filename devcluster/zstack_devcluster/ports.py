"""Free TCP ports for private server instances.

Ports are picked at random *below* the kernel's ephemeral range (``ip_local_port_range``): an outgoing
connection can then never be handed one of them as its local port, so a server stopped for a while can
bind the same port again when it restarts.
"""

from __future__ import annotations

import random
import socket
import threading

_LOWEST = 20000
_FALLBACK_EPHEMERAL_LOW = 32768
_lock = threading.Lock()
_handed_out: set[int] = set()


def ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (TIME_WAIT leftovers do not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host``, never handed out before by this process."""
    rng = random.SystemRandom()
    high = ephemeral_low() - 1
    chosen: list[int] = []
    with _lock:
        if high - _LOWEST < 1000:  # unusual ip_local_port_range: let the kernel choose
            while len(chosen) < count:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((host, 0))
                    port = sock.getsockname()[1]
                if port not in _handed_out and port not in chosen:
                    chosen.append(port)
        else:
            for _ in range(5000):
                if len(chosen) == count:
                    break
                port = rng.randint(_LOWEST, high)
                if port in _handed_out or port in chosen or not port_is_free(port, host):
                    continue
                chosen.append(port)
        if len(chosen) < count:
            raise OSError(f"could not find {count} free TCP ports on {host} in {_LOWEST}-{high}")
        _handed_out.update(chosen)
    return chosen


def free_port(host: str = "127.0.0.1") -> int:
    """One free port on ``host`` (see :func:`free_ports`)."""
    return free_ports(1, host)[0]
