"""The container node: containerd, runc, the CNI bridge, a real kubelet, kube-proxy and CoreDNS, in a network
namespace of their own (``zstack-dev up --node containers``)."""
