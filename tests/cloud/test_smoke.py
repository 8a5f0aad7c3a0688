"""One MN: hosts and VMs through the REST API, end to end."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_host_and_vm_lifecycle(cloud):
    cloud.start(1)
    api = cloud.api()
    host = api.add_host(cpu=8, memory=8192)
    assert host["state"] == "Connected" and host["cpu_used"] == 0
    job = api.run("POST", "/v1/vms", {"name": "vm1", "cpu": 2, "memory": 1024})
    assert job["state"] == "Succeeded", job
    vm = job["result"]
    assert vm["state"] == "Running" and vm["host_uuid"] == host["uuid"]
    assert api.ok("GET", f"/v1/hosts/{host['uuid']}", 200)["cpu_used"] == 2
    for action, state in [("stop", "Stopped"), ("start", "Running"), ("reboot", "Running")]:
        job = api.run("POST", f"/v1/vms/{vm['uuid']}/actions/{action}")
        assert job["state"] == "Succeeded" and job["result"]["state"] == state, job
    job = api.run("DELETE", f"/v1/vms/{vm['uuid']}")
    assert job["state"] == "Succeeded" and job["result"]["state"] == "Destroyed"
    assert api.ok("GET", f"/v1/hosts/{host['uuid']}", 200)["cpu_used"] == 0
    assert api.run("DELETE", f"/v1/hosts/{host['uuid']}")["state"] == "Succeeded"
    assert api.ok("GET", "/v1/hosts", 200) == {"hosts": []}
