"""`python -m zstack_devcluster.kubelet --kubeconfig PATH --root DIR --node-name NAME`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from zstack_devcluster.kubelet.context import Settings
from zstack_devcluster.kubelet.kubelet import Kubelet
from zstack_devcluster.kubelet.podnet import PodNetworkError, check_cidr


def parse_taints(text: str) -> tuple[dict[str, str], ...]:
    """'k=v:NoSchedule,k2:NoExecute' -> Node taints."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        kv, sep, effect = item.rpartition(":")
        if not sep or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise argparse.ArgumentTypeError(f"bad taint {item!r}: want key[=value]:Effect")
        key, _, value = kv.partition("=")
        out.append({"key": key, "effect": effect, **({"value": value} if value else {})})
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m zstack_devcluster.kubelet", description="Run pods as local processes.")
    p.add_argument("--kubeconfig", required=True, help="kubeconfig of the kubelet's own identity")
    p.add_argument("--root", required=True, type=Path, help="state directory; pods live in ROOT/pods")
    p.add_argument("--node-name", required=True, help="name of the Node to register")
    p.add_argument("--backoff-initial", type=float, default=10.0, help="first CrashLoopBackOff delay (s)")
    p.add_argument("--backoff-max", type=float, default=300.0, help="longest CrashLoopBackOff delay (s)")
    p.add_argument("--shutdown-grace", type=float, default=8.0,
                   help="on SIGTERM, longest wait for containers before SIGKILL (s)")
    p.add_argument("--max-pods", type=int, default=110)
    p.add_argument("--cpu", default="", help="advertised cpu capacity (default: max(host cpus, 16))")
    p.add_argument("--memory", default="", help="advertised memory capacity (default: max(host, 64Gi))")
    p.add_argument("--pod-cidr", default="",
                   help="IPv4 range for pod IPs instead of 127.0.x.y, routed locally (needs root); "
                        "lets EndpointSlices carry pod IPs. See devcluster/kubelet/podnet.py")
    p.add_argument("--register-with-taints", default="", type=parse_taints,
                   help="comma-separated key[=value]:Effect taints for the new Node")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    settings = Settings(
        node_name=args.node_name,
        root=args.root.resolve(),
        kubeconfig=args.kubeconfig,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
        shutdown_grace=args.shutdown_grace,
        max_pods=args.max_pods,
        cpu=args.cpu,
        memory=args.memory,
        pod_cidr=args.pod_cidr,
        taints=args.register_with_taints,
    )
    try:
        if settings.pod_cidr:
            check_cidr(settings.pod_cidr)
        kubelet = Kubelet(settings)
    except PodNetworkError as e:
        print(f"kubelet: {e}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("got signal %d", signum)
        kubelet.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        kubelet.run()
    except PodNetworkError as e:
        print(f"kubelet: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
