"""Pod command for the API-partition test: `zstack-node`, except that the pod named $PARTITION_POD reaches
the API server through $PARTITION_SERVER (a TCP proxy the test controls) instead of the real address.

The process kubelet writes the pod's kubeconfig; this copies it with the server replaced, points KUBECONFIG
at the copy, and execs zstack-node (same process, so the kubelet's pidfile stays right).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml


def main() -> None:
    pod, server = os.environ.get("PARTITION_POD"), os.environ.get("PARTITION_SERVER")
    if pod and server and os.environ.get("POD_NAME") == pod:
        config = yaml.safe_load(Path(os.environ["KUBECONFIG"]).read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = server
        copy = Path(os.environ["ZSTACK_POD_ROOT"]) / "kubeconfig-through-proxy"
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the pod's token
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
        os.environ["KUBECONFIG"] = str(copy)
    os.execv(sys.executable, [sys.executable, "-m", "zstack_node"])


if __name__ == "__main__":
    main()
