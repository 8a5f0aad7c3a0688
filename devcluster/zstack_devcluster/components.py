"""The control plane's components: how each one is started (argv) and how its health is checked (the
container node's are in containernode/node.py)."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from zstack_devcluster import health
from zstack_devcluster.layout import Layout
from zstack_devcluster.pki import FRONT_PROXY_CLIENT, SERVICE_CIDR
from zstack_devcluster.tools import tool_path

SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

Ports = dict[str, int]


@dataclass(frozen=True)
class Component:
    """One process of the devcluster."""

    name: str
    ports: tuple[str, ...]  # names of the ports it listens on, allocated once and kept in state.json
    argv: Callable[[Layout, Ports], list[str]]
    healthy: Callable[[Layout, Ports, ssl.SSLContext], bool]
    what: str  # what "healthy" means, for progress and error messages


def _etcd_argv(lay: Layout, p: Ports) -> list[str]:
    client, peer = f"http://127.0.0.1:{p['etcd-client']}", f"http://127.0.0.1:{p['etcd-peer']}"
    return [
        str(tool_path("etcd")),
        "--name=devcluster",
        f"--data-dir={lay.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=devcluster={peer}",
        "--initial-cluster-state=new",
        "--unsafe-no-fsync",  # a throwaway dev store: trade durability for speed
        "--quota-backend-bytes=2147483648",
        "--log-level=warn",
    ]


def _apiserver_argv(lay: Layout, p: Ports) -> list[str]:
    pki = lay.pki
    return [
        str(tool_path("kube-apiserver")),
        f"--etcd-servers=http://127.0.0.1:{p['etcd-client']}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={p['apiserver']}",
        f"--tls-cert-file={pki.server_crt}",
        f"--tls-private-key-file={pki.server_key}",
        f"--client-ca-file={pki.ca_crt}",
        f"--service-account-issuer={SA_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",  # a node's kubelet edits only its Node and its pods
        # Request-header (aggregation layer) config, so delegated authn in the other components is complete.
        f"--requestheader-client-ca-file={pki.front_proxy_ca_crt}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={pki.client_crt(FRONT_PROXY_CLIENT)}",
        f"--proxy-client-key-file={pki.client_key(FRONT_PROXY_CLIENT)}",
        "--allow-privileged=true",
        # 127.0.0.1 may not appear in Endpoints/EndpointSlices, so do not publish the `kubernetes` endpoints.
        "--endpoint-reconciler-type=none",
        # Logs, exec and port-forward reach a kubelet by its InternalIP, as the admin.
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-client-certificate={pki.client_crt('admin')}",
        f"--kubelet-client-key={pki.client_key('admin')}",
        "--profiling=false",
        f"--cert-dir={lay.root / 'apiserver'}",
    ]


def _control_argv(binary: str, client: str, port_name: str) -> Callable[[Layout, Ports], list[str]]:
    """argv builder shared by controller-manager and scheduler (same serving/auth flags)."""

    def build(lay: Layout, p: Ports) -> list[str]:
        kubeconfig = lay.component_kubeconfig(client)
        return [
            str(tool_path(binary)),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={p[port_name]}",
            f"--tls-cert-file={lay.pki.server_crt}",
            f"--tls-private-key-file={lay.pki.server_key}",
            f"--client-ca-file={lay.pki.ca_crt}",
            "--leader-elect=false",  # one instance; avoids waiting out a stale lease after a restart
        ]

    return build


def _controller_manager_argv(lay: Layout, p: Ports) -> list[str]:
    pki = lay.pki
    return _control_argv("kube-controller-manager", "controller-manager", "controller-manager")(lay, p) + [
        f"--root-ca-file={pki.ca_crt}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--cluster-signing-cert-file={pki.ca_crt}",
        f"--cluster-signing-key-file={pki.ca_key}",
        "--use-service-account-credentials=true",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        "--cluster-name=devcluster",
        "--controllers=*",
    ]


COMPONENTS: tuple[Component, ...] = (
    Component(
        "etcd", ("etcd-client", "etcd-peer"), _etcd_argv,
        lambda lay, p, ctx: health.etcd_healthy(p["etcd-client"]), "/health",
    ),
    Component(
        "kube-apiserver", ("apiserver",), _apiserver_argv,
        lambda lay, p, ctx: health.https_ok(p["apiserver"], "/readyz", ctx), "/readyz",
    ),
    Component(
        "kube-controller-manager", ("controller-manager",), _controller_manager_argv,
        lambda lay, p, ctx: (health.https_ok(p["controller-manager"], "/healthz", ctx)
                             and health.default_service_account(p["apiserver"], ctx)),
        "/healthz and ServiceAccount default/default",
    ),
    Component(
        "kube-scheduler", ("scheduler",), _control_argv("kube-scheduler", "scheduler", "scheduler"),
        lambda lay, p, ctx: health.https_ok(p["scheduler"], "/healthz", ctx), "/healthz",
    ),
)
