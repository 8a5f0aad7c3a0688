"""Opt-in pod network outside 127/8, so that EndpointSlices can carry pod IPs.

The API server rejects loopback addresses in EndpointSlices and Endpoints. With
`--pod-cidr 198.18.0.0/16` (say) the kubelet makes the whole range local the way
127.0.0.0/8 is, with one route in the kernel's `local` table:

    ip route replace local 198.18.0.0/16 dev lo table local

after which any address of the range can be bound and reached on this machine,
without one interface address per pod. This needs CAP_NET_ADMIN (root) once;
the route is left in place at exit (other devclusters may use it). Remove it with
`ip route del local <cidr> dev lo table local`. Pick a range this machine does
not otherwise reach: 198.18.0.0/15 is reserved for benchmarking (RFC 2544).
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
import socket
import subprocess

log = logging.getLogger(__name__)


class PodNetworkError(RuntimeError):
    """The pod CIDR cannot be made local."""


def check_cidr(cidr: str) -> ipaddress.IPv4Network:
    """Parse and sanity-check a pod CIDR."""
    try:
        net = ipaddress.IPv4Network(cidr)
    except ValueError as e:
        raise PodNetworkError(f"--pod-cidr {cidr!r}: {e}") from e
    if net.prefixlen > 30:
        raise PodNetworkError(f"--pod-cidr {cidr}: too small")
    if net.is_loopback or net.is_link_local or net.is_multicast or net.is_unspecified:
        raise PodNetworkError(f"--pod-cidr {cidr}: loopback, link-local and multicast ranges are not allowed")
    return net


def bindable(ip: str) -> bool:
    """Whether this machine accepts a socket bound to ip."""
    with socket.socket() as s:
        try:
            s.bind((ip, 0))
            return True
        except OSError:
            return False


def ensure_local(cidr: str) -> None:
    """Make every address of cidr local (see the module docstring), or raise PodNetworkError."""
    net = check_cidr(cidr)
    probe = str(net.network_address + 1)
    if bindable(probe):
        return
    ip_cmd = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
    if not ip_cmd:
        raise PodNetworkError("the `ip` command (iproute2) is needed to route --pod-cidr to the loopback device")
    argv = [ip_cmd, "route", "replace", "local", str(net), "dev", "lo", "table", "local"]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0 or not bindable(probe):
        raise PodNetworkError(
            f"cannot make {net} local: `{' '.join(argv)}` failed ({out.stderr.strip() or out.returncode}); "
            "this needs root (CAP_NET_ADMIN)"
        )
    log.info("routed pod CIDR %s to the loopback device", net)
