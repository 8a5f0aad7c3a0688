"""The container node's files: where each lives under ``DIR/node``, and what containerd, the CNI, the
kubelet, kube-proxy and CoreDNS are told. All of it is written by `up` and is private to the directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zstack_devcluster.containernode.network import NodeNetwork
from zstack_devcluster.layout import NODE_NAME, Layout

PAUSE_IMAGE = "localhost/zstack-pause:1.0"
CLUSTER_DOMAIN = "cluster.local"
KUBELET_PORT = 10250
KUBE_PROXY_HEALTH_PORT = 10256
KUBELET_HEALTH_PORT = 10248
NETWORK_POLICY_HEALTH_PORT = 20244  # kube-router's
STORAGE_CLASS = "local"
VOLUMES = 12  # hostPath PersistentVolumes made at `up`, for the StatefulSets' claims (no provisioner here)
VOLUME_SIZE = "10Gi"
MANAGED_LABELS = {"app.kubernetes.io/managed-by": "zstack-dev"}  # on every volume and role the node publishes
# The client certificate (pki.CLIENTS) each component of the node talks to the API server with.
IDENTITIES = {"kubelet": "node", "kube-proxy": "kube-proxy", "coredns": "coredns", "kube-router": "kube-router"}


@dataclass(frozen=True)
class NodeFiles:
    """Paths of one container node, under ``DIR/node``."""

    root: Path

    @classmethod
    def of(cls, lay: Layout) -> NodeFiles:
        return cls(lay.root / "node")

    @property
    def containerd_socket(self) -> Path:
        return self.root / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd-state"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def pod_logs(self) -> Path:
        """The containers' logs (the kubelet's podLogsDir; its default, /var/log/pods, is the host's)."""
        return self.root / "pod-logs"

    def volume(self, index: int) -> Path:
        return self.root / "volumes" / f"pv-{index}"

    def config(self, name: str) -> Path:
        return self.root / "etc" / name

    def cgroup_root(self, net: NodeNetwork) -> str:
        """The kubelet's cgroupRoot: one per node number, so two devclusters never share one."""
        return f"zstack-dev-{net.index}"


def write_all(lay: Layout, net: NodeNetwork, apiserver_port: int) -> None:
    """Write every config file of the node (cheap; `up` rewrites them each time)."""
    files = NodeFiles.of(lay)
    for sub in ("etc", "containerd-root", "containerd-state", "runc", "cni-ipam", "kubelet", "pod-logs"):
        (files.root / sub).mkdir(parents=True, exist_ok=True)
    (files.root / "etc" / "cni").mkdir(exist_ok=True)
    writes = {
        "containerd.toml": containerd_toml(files),
        "cni/10-zstack-dev.conflist": json.dumps(cni_conflist(files, net), indent=2) + "\n",
        "kubelet.yaml": json.dumps(kubelet_config(lay, files, net), indent=2) + "\n",
        "kube-proxy.yaml": json.dumps(kube_proxy_config(files, net), indent=2) + "\n",
        "Corefile": corefile(files, net),
        "resolv.conf": f"nameserver {net.node_ip}\nsearch {CLUSTER_DOMAIN}\noptions ndots:5\n",
        **{kubeconfig_name(component): component_kubeconfig(lay, net, apiserver_port, client)
           for component, client in IDENTITIES.items()},
    }
    for name, text in writes.items():
        path = files.config(name)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    for component in IDENTITIES:
        files.config(kubeconfig_name(component)).chmod(0o600)


def kubeconfig_name(component: str) -> str:
    return f"{component}.kubeconfig"


def containerd_toml(files: NodeFiles) -> str:
    """containerd with its own root, state, socket and runc root; CRI settings this VM needs."""
    root = files.root
    return f"""# Written by zstack-dev: a containerd private to this devcluster.
version = 2
root = "{root / 'containerd-root'}"
state = "{files.containerd_state}"
[grpc]
  address = "{files.containerd_socket}"
[ttrpc]
  address = "{files.containerd_socket}.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM lacks CAP_SYS_RESOURCE (no negative OOM scores) and AppArmor.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # Pods' network namespaces under our state dir, not the host's /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{root / 'runc'}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{files.config('cni')}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = ""
"""


def cni_conflist(files: NodeFiles, net: NodeNetwork) -> dict[str, object]:
    """A bridge with host-local addresses and port mappings; no masquerade (nothing is routed out)."""
    return {
        "cniVersion": "1.0.0",
        "name": "zstack-dev",
        "plugins": [
            {"type": "bridge", "bridge": "zsd0", "isGateway": True, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": net.pod_cidr}]],
                      "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(files.root / "cni-ipam")}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(lay: Layout, files: NodeFiles, net: NodeNetwork) -> dict[str, object]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # This VM has cgroup v1 only (kubelet >= 1.35 refuses it unless told).
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": "/" + files.cgroup_root(net),
        "containerRuntimeEndpoint": f"unix://{files.containerd_socket}",
        "address": net.node_ip,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": net.node_ip,
        "healthzPort": KUBELET_HEALTH_PORT,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(lay.pki.ca_crt)}},
        "authorization": {"mode": "Webhook"},
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [net.node_ip],
        "resolvConf": str(files.config("resolv.conf")),
        "failSwapOn": False,
        "protectKernelDefaults": False,
        # A dev node on a shared disk: never evict or collect images for disk pressure.
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "shutdownGracePeriod": "0s",
        "podCIDR": net.pod_cidr,
        "podLogsDir": str(files.pod_logs),
    }


def kube_proxy_config(files: NodeFiles, net: NodeNetwork) -> dict[str, object]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(files.config(kubeconfig_name("kube-proxy")))},
        "mode": "iptables",
        "clusterCIDR": net.pod_cidr,
        "bindAddress": net.node_ip,
        "healthzBindAddress": f"{net.node_ip}:{KUBE_PROXY_HEALTH_PORT}",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{net.node_ip}/32"],
        # Leave the (global) conntrack table size and timeouts alone.
        "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "hostnameOverride": NODE_NAME,
    }


def corefile(files: NodeFiles, net: NodeNetwork) -> str:
    """The cluster domain from the API server; every other name is NXDOMAIN (nothing is forwarded out)."""
    kubeconfig = files.config(kubeconfig_name("coredns"))
    return f"""# Written by zstack-dev: cluster names only, no forwarding to the host's resolver.
{CLUSTER_DOMAIN}:53 in-addr.arpa:53 {{
    bind {net.node_ip}
    errors
    health {net.node_ip}:8080
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        ttl 5
    }}
    cache 5
}}
.:53 {{
    bind {net.node_ip}
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
"""


def component_kubeconfig(lay: Layout, net: NodeNetwork, apiserver_port: int, client: str) -> str:
    """A node component reaches the API server on the host's end of the veth (as `localhost` for TLS), with
    the client certificate `client` (pki.CLIENTS)."""
    pki = lay.pki
    return f"""apiVersion: v1
kind: Config
clusters:
- name: devcluster
  cluster:
    server: https://{net.host_ip}:{apiserver_port}
    certificate-authority: {pki.ca_crt}
    tls-server-name: localhost
users:
- name: {client}
  user:
    client-certificate: {pki.client_crt(client)}
    client-key: {pki.client_key(client)}
contexts:
- name: {client}
  context: {{cluster: devcluster, user: {client}}}
current-context: {client}
"""


def component_roles() -> list[dict[str, object]]:
    """ClusterRoles for the two components Kubernetes has no built-in role for, bound to their users: what
    CoreDNS's `kubernetes` plugin and kube-router's firewall controller watch, read-only."""
    read = ["get", "list", "watch"]
    rules = {
        "coredns": [{"apiGroups": [""], "resources": ["services", "endpoints", "pods", "namespaces"], "verbs": read},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}],
        "kube-router": [{"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                         "verbs": read},
                        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": read},
                        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read}],
    }
    objects: list[dict[str, object]] = []
    for component, role_rules in rules.items():
        name = f"zstack-dev:{component}"
        meta = {"name": name, "labels": MANAGED_LABELS}
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": meta,
                        "rules": role_rules})
        objects.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": meta,
                        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": name}]})
    return objects


def kubernetes_endpoints(net: NodeNetwork, apiserver_port: int) -> dict[str, object]:
    """The `kubernetes` Service's EndpointSlice: the forwarder on the host's end of the veth.

    The API server listens on loopback (it publishes no endpoints of its own), so pods reach it
    through 10.96.0.1:443 -> kube-proxy -> this address.
    """
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes",
                                "endpointslice.kubernetes.io/managed-by": "zstack-dev"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [net.host_ip], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": apiserver_port, "protocol": "TCP"}],
    }



def storage(files: NodeFiles) -> list[dict[str, object]]:
    """A default StorageClass and VOLUMES hostPath PersistentVolumes in it, as a no-provisioner local class.

    Each claim binds one volume once its pod is scheduled. The directories are world-writable (sticky),
    because hostPath volumes get no fsGroup ownership and each image runs as a user of its own.
    """
    objects: list[dict[str, object]] = [{
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }]
    for index in range(VOLUMES):
        objects.append({
            "apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"zstack-dev-pv-{index}", "labels": MANAGED_LABELS},
            "spec": {"capacity": {"storage": VOLUME_SIZE}, "accessModes": ["ReadWriteOnce"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                     "hostPath": {"path": str(files.volume(index)), "type": "Directory"}},
        })
    return objects
