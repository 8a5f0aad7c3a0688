{{/* The release's full name: the release name, or "<release>-zstack-operator" when it lacks the chart name. */}}
{{- define "zstack-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator's pods (immutable once installed). */}}
{{- define "zstack-operator.selectorLabels" -}}
app.kubernetes.io/name: zstack-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "zstack-operator.labels" -}}
{{ include "zstack-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "zstack-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "zstack-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository@digest when image.digest is set (the tag is then ignored), else repository:tag. */}}
{{- define "zstack-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/*
The rights the operator needs in every namespace it watches, and nothing more: one list, used by the
ClusterRole (all namespaces) and by each Role (watchNamespaces). The operator's e2e tests run it with these.
  - ZStackClusters: watch them, write their status; kopf keeps its progress in their annotations (patch).
  - Children it creates and owns: StatefulSets, Services, ConfigMaps, ServiceAccounts, RoleBindings,
    PodDisruptionBudgets, NetworkPolicies, ServiceMonitors/PodMonitors. Server-side apply is a patch; pruning a child that a
    spec turned off is get + delete.
  - Secrets: create (generated credentials and the API's certificate) only. It never reads, lists or updates a Secret: MN pods take
    URLs and tokens from them by secretKeyRef.
  - Pods: list and watch (status: readiness and the MNs' rings; a pod event refreshes it); Events: create.
  - MN rights: no Lease access and no Roles. Each cluster's RoleBinding points at the fixed ClusterRole
    rbac.mnClusterRole; "bind" on that one name lets the operator grant it without holding its rights.
*/}}
{{- define "zstack-operator.namespacedRules" -}}
- apiGroups: ["zstack.io"]
  resources: ["zstackclusters"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["zstack.io"]
  resources: ["zstackclusters/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "podmonitors"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "patch"]
# ConfigMaps: the MN settings, and the API's CA certificate, which the operator reads to verify the MNs.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# Each cluster's MNs get their rights from one RoleBinding to the fixed ClusterRole below. The operator may
# bind that ClusterRole and no other: it holds no Lease rights itself and cannot write Roles.
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["rolebindings"]
  verbs: ["create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["clusterroles"]
  verbs: ["bind"]
  resourceNames: [{{ .Values.rbac.mnClusterRole | quote }}]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/* The MN's rights: the same rules as node/zstack_node/manifests/mn-rbac.yaml (a test keeps them equal). */}}
{{- define "zstack-operator.mnRules" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get"]
{{- end -}}

{{/* kopf lists and watches CRDs to notice resources appearing and going: cluster-scoped in both modes. */}}
{{- define "zstack-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* Watching named namespaces, kopf also lists and watches namespaces, to notice a watched one being
deleted or created again (without this it warns and only learns of them at restart). */}}
{{- define "zstack-operator.namespaceRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end -}}

{{/* Values the schema cannot check (relations between fields): fail with a message naming them. */}}
{{- define "zstack-operator.validate" -}}
{{- $le := .Values.leaderElection -}}
{{- if and (gt (int .Values.replicaCount) 1) (not $le.enabled) -}}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: several replicas would reconcile at once; enable leader election or set replicaCount to 1" (int .Values.replicaCount)) -}}
{{- end -}}
{{- if $le.enabled -}}
{{- if not (lt (float64 $le.renewDeadline) (float64 $le.leaseDuration)) -}}
{{- fail (printf "leaderElection.renewDeadline (%v) must be less than leaderElection.leaseDuration (%v)" $le.renewDeadline $le.leaseDuration) -}}
{{- end -}}
{{- if not (lt (float64 $le.retryPeriod) (float64 $le.renewDeadline)) -}}
{{- fail (printf "leaderElection.retryPeriod (%v) must be less than leaderElection.renewDeadline (%v)" $le.retryPeriod $le.renewDeadline) -}}
{{- end -}}
{{- end -}}
{{- if .Values.podDisruptionBudget.enabled -}}
{{- if lt (int .Values.replicaCount) 2 -}}
{{- fail "podDisruptionBudget.enabled needs replicaCount of 2 or more: with one replica a PDB would block every node drain" -}}
{{- end -}}
{{- $min := .Values.podDisruptionBudget.minAvailable -}}
{{- if and (not (kindIs "string" $min)) (ge (int $min) (int .Values.replicaCount)) -}}
{{- fail (printf "podDisruptionBudget.minAvailable (%d) must be less than replicaCount (%d): otherwise no replica may ever be evicted and node drains hang" (int $min) (int .Values.replicaCount)) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled -}}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: Prometheus would scrape the operator twice and double every rate; pick one" -}}
{{- end -}}
{{- end -}}
