"""The cloud services every MN hosts by default, in start order."""

from __future__ import annotations

from zstack_node.cloud.api import ApiService
from zstack_node.cloud.hosts import HostService
from zstack_node.cloud.vms import VmService
from zstack_node.service import Service

SERVICES: list[type[Service]] = [HostService, VmService, ApiService]
