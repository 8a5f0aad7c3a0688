"""`zstack-dev demo`: a ring of MN processes with private servers, started and stopped as a unit."""

from __future__ import annotations

import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from devcluster import demo

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[1].split()[0] != "Z"


def test_demo_up_forms_one_ring_and_down_leaves_nothing(tmp_path):
    ready = demo.up(tmp_path, replicas=2, say=lambda _msg: None)
    try:
        assert len(ready["members"]) == 2
        for node in ready["nodes"]:
            with urllib.request.urlopen(node["url"] + "/v1/cluster/ring", timeout=5) as response:
                assert sorted(json.load(response)["members"]) == ready["members"]
        assert "***" in ready["broker"] and "***" in ready["database"], "passwords must be masked"
        _check_api_needs_the_demo_token(ready)
        assert demo.up(tmp_path, replicas=2, say=lambda _msg: None) == ready, "a second up is a no-op"
    finally:
        stopped = demo.down(tmp_path)
    assert stopped
    assert not [n["pid"] for n in ready["nodes"] if _alive(n["pid"])]
    assert "left the ring gracefully" in Path(ready["nodes"][0]["log"]).read_text()
    assert demo.down(tmp_path) is False


def _check_api_needs_the_demo_token(ready: dict) -> None:
    token_file = Path(ready["api_token_file"])
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600, "the API token must be readable by its owner only"
    url = ready["nodes"][0]["url"] + "/v1/vms"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=5)
    assert refused.value.code == 401
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert json.load(response) == {"vms": []}
