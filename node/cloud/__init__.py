"""The cloud an MN manages: hosts, VMs, the allocator, durable jobs and the REST API.

`SERVICES` lists the service classes every MN hosts by default (before any `--service` extras).
"""

from __future__ import annotations

from ..service import Service
from .api import ApiService
from .hosts import HostService
from .vms import VmService

SERVICES: list[type[Service]] = [HostService, VmService, ApiService]
