"""Process kubelet: runs the pods bound to one Node as local processes (see README.md)."""
