"""The Kubernetes client layer shared by the management node (its Lease), the operator and the dev tools."""
