"""Pod IPs: one local address per pod.

Default: loopback. Linux routes all of 127.0.0.0/8 to the loopback device, so
any 127.x.y.z can be bound without configuring anything. Pods get 127.0.x.y
with x in 1..255 and y in 1..254 (127.0.0.0/24, and so 127.0.0.1, stays with
the host).

Opt-in (`--pod-cidr`): addresses from another IPv4 range that podnet.py has
made local (see there); unlike loopback ones, the API server accepts those in
EndpointSlices.

Either way the lowest free address is handed out (last octet 0 and 255 are
skipped), so freed addresses are reused. Several devclusters may run on one
machine (a developer's plus the test session's), so an address is also
reserved host-wide: the owning kubelet holds an flock on
LOCK_DIR/<ip>.lock. The kernel drops the lock when that kubelet dies, so a
crashed kubelet never leaks addresses.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import tempfile
import threading
from pathlib import Path

LOOPBACK_RANGE = ("127.0.1.1", "127.0.255.254")


def default_lock_dir() -> Path:
    """Where kubelets on this machine coordinate their pod addresses."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    return Path(base) / f"zstack-devcluster-ipam-{os.getuid()}"


def _usable(n: int) -> bool:
    return 0 < (n & 0xFF) < 255


class IPExhausted(RuntimeError):
    """Every pod address is in use."""


class PodIPAM:
    """Hands out unique pod addresses keyed by pod UID."""

    def __init__(self, cidr: str | None = None, lock_dir: Path | None = None) -> None:
        if cidr:
            net = ipaddress.IPv4Network(cidr)
            self.first, self.last = int(net.network_address) + 1, int(net.broadcast_address) - 1
        else:
            self.first, self.last = (int(ipaddress.IPv4Address(a)) for a in LOOPBACK_RANGE)
        self._lock = threading.Lock()
        self._by_owner: dict[str, int] = {}
        self._used: set[int] = set()
        self._fds: dict[int, int] = {}
        self._dir = lock_dir or default_lock_dir()
        self._dir.mkdir(parents=True, exist_ok=True)

    @property
    def description(self) -> str:
        return f"{ipaddress.IPv4Address(self.first)}-{ipaddress.IPv4Address(self.last)}"

    def valid(self, ip: str) -> bool:
        """Whether ip is in the range this allocator manages."""
        try:
            n = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return False
        return self.first <= n <= self.last and _usable(n)

    def allocate(self, owner: str, preferred: str | None = None) -> str:
        """Return owner's address; take `preferred` when it is valid and free."""
        with self._lock:
            if owner in self._by_owner:
                return str(ipaddress.IPv4Address(self._by_owner[owner]))
            if preferred and self.valid(preferred):
                n = int(ipaddress.IPv4Address(preferred))
                if n not in self._used and self._reserve(n):
                    return self._take(owner, n)
            for n in range(self.first, self.last + 1):
                if _usable(n) and n not in self._used and self._reserve(n):
                    return self._take(owner, n)
        raise IPExhausted(f"no free pod address left in {self.description}")

    def _reserve(self, n: int) -> bool:
        """Take the host-wide lock of address n; False when another kubelet holds it."""
        fd = os.open(self._dir / f"{ipaddress.IPv4Address(n)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fds[n] = fd
        return True

    def _take(self, owner: str, n: int) -> str:
        self._by_owner[owner] = n
        self._used.add(n)
        return str(ipaddress.IPv4Address(n))

    def release(self, owner: str) -> None:
        """Free owner's address, if it has one."""
        with self._lock:
            n = self._by_owner.pop(owner, None)
            if n is not None:
                self._used.discard(n)
                fd = self._fds.pop(n, None)
                if fd is not None:
                    os.close(fd)

