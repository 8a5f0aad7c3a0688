"""The tests' copy of the container node's pod logs (tests/fixtures/podlogs.py): a deleted MN pod's last
words must still be readable, in the order the containers ran."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.fixtures.podlogs import PodLogKeeper


def write_log(root: Path, pod_dir: str, restart: int, *lines: str) -> None:
    path = root / pod_dir / "mn" / f"{restart}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(line + "\n" for line in lines)


def test_restarts_and_pods_of_one_name_read_in_the_order_they_ran(tmp_path: Path) -> None:
    write_log(tmp_path, "ns_demo-mn-0_uid2", 0, "2026-12-04T10:00:09.5Z stderr F second pod")
    write_log(tmp_path, "ns_demo-mn-0_uid1", 1, "2026-12-04T10:00:01.25Z stderr F restarted")
    write_log(tmp_path, "ns_demo-mn-0_uid1", 0, "2026-12-04T10:00:00.125Z stderr F first ",
              "2026-12-04T10:00:00.2Z stderr P par", "2026-12-04T10:00:00.3Z stderr F tial line")
    write_log(tmp_path, "ns_demo-mn-1_uid3", 0, "2026-12-04T10:00:00Z stderr F another pod")
    write_log(tmp_path, "other_demo-mn-0_uid4", 0, "2026-12-04T10:00:00Z stderr F another namespace")
    keeper = PodLogKeeper(tmp_path)
    assert keeper.log("ns", "demo-mn-0", "mn") == "first \npartial line\nrestarted\nsecond pod\n"
    assert keeper.log("ns", "demo-mn-0", "other-container") == ""


def test_a_deleted_pods_log_is_kept_and_the_copying_goes_on(tmp_path: Path) -> None:
    keeper = PodLogKeeper(tmp_path, period=0.01)
    write_log(tmp_path, "ns_demo-mn-2_uid", 0, "2026-12-04T10:00:00Z stderr F joined")
    keeper.scan()
    write_log(tmp_path, "ns_demo-mn-2_uid", 0, "2026-12-04T10:00:01Z stderr F left the ring gracefully")
    keeper.scan()
    shutil.rmtree(tmp_path / "ns_demo-mn-2_uid")  # the kubelet removes a deleted pod's logs
    (tmp_path / "ns_gone_uid").mkdir()
    keeper.start()
    try:
        assert keeper.log("ns", "demo-mn-2") == "joined\nleft the ring gracefully\n"
        assert keeper._thread is not None and keeper._thread.is_alive()
    finally:
        keeper.stop()
