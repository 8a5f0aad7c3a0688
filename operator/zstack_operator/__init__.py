"""zstack-operator: reconciles ZStackCluster resources into management-node StatefulSets (kopf)."""
