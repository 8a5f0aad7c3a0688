"""`zstack-operator`: run the ZStackCluster operator (kopf), in-cluster or from a kubeconfig."""

from __future__ import annotations

import logging
import os
import sys

import click

from zstack_operator.app import OperatorOptions, run
from zstack_operator.mn import MN_CLUSTER_ROLE


def _opt(name: str, **kwargs):  # noqa: ANN202 - a click decorator
    env = "ZSTACK_OPERATOR_" + name.upper().replace("-", "_")
    return click.option(f"--{name}", envvar=env, show_envvar=True, show_default=True, **kwargs)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="zstack-k8s", prog_name="zstack-operator")
@click.option("-n", "--namespace", "namespaces", multiple=True, envvar="ZSTACK_OPERATOR_NAMESPACES",
              show_envvar=True, help="Watch ZStackClusters in this namespace (repeat for more)")
@click.option("-A", "--all-namespaces", is_flag=True, envvar="ZSTACK_OPERATOR_ALL_NAMESPACES", show_envvar=True,
              help="Watch ZStackClusters in every namespace")
@_opt("http-bind", default="0.0.0.0", help="Address of the /healthz (liveness), /readyz and /metrics port")
@_opt("http-port", default=8081, type=click.IntRange(0, 65535), help="Port of /healthz, /readyz and /metrics")
@click.option("--leader-election/--no-leader-election", default=True, envvar="ZSTACK_OPERATOR_LEADER_ELECTION",
              show_envvar=True, show_default=True,
              help="Run as one of several replicas: only the holder of a Lease reconciles")
@_opt("leader-election-namespace", default=None,
      help="Namespace of the leader Lease  [default: $POD_NAMESPACE, else default]")
@_opt("leader-election-id", default="zstack-operator", help="Name of the leader Lease")
@_opt("lease-duration", default=15.0, type=click.FloatRange(min=1), help="Seconds a standby waits for a silent leader")
@_opt("renew-deadline", default=10.0, type=click.FloatRange(min=0.5), help="Seconds a leader may fail to renew")
@_opt("retry-period", default=2.0, type=click.FloatRange(min=0.1), help="Seconds between Lease attempts")
@_opt("mn-cluster-role", default=MN_CLUSTER_ROLE,
      help="ClusterRole each cluster's MNs are bound to (the chart's rbac.mnClusterRole)")
@_opt("resync-interval", default=30.0, type=click.FloatRange(min=1), help="Seconds between periodic reconciles")
@_opt("status-interval", default=1.0, type=click.FloatRange(min=0.1),
      help="Seconds between status refreshes (pods and MN rings) of a cluster that is changing")
@_opt("idle-status-interval", default=10.0, type=click.FloatRange(min=0.1),
      help="Seconds between status refreshes of a Ready, stable cluster (MN pod events refresh at once)")
@_opt("log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def main(namespaces: tuple[str, ...], all_namespaces: bool, http_bind: str, http_port: int, leader_election: bool,
         leader_election_namespace: str | None, leader_election_id: str, lease_duration: float,
         renew_deadline: float, retry_period: float, mn_cluster_role: str, resync_interval: float,
         status_interval: float, idle_status_interval: float, log_level: str) -> None:
    """Reconcile ZStackCluster resources into management-node StatefulSets, Services, Secrets and more."""
    if bool(namespaces) == all_namespaces:
        raise click.UsageError("pass --namespace NS (repeatable) or --all-namespaces, not both and not neither")
    if leader_election and not renew_deadline < lease_duration:
        raise click.BadParameter(f"{renew_deadline} must be less than --lease-duration ({lease_duration})",
                                 param_hint="--renew-deadline")
    if leader_election and not retry_period < renew_deadline:
        raise click.BadParameter(f"{retry_period} must be less than --renew-deadline ({renew_deadline})",
                                 param_hint="--retry-period")
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = OperatorOptions(
        namespaces=namespaces, http_bind=http_bind, http_port=http_port, leader_election=leader_election,
        leader_election_namespace=leader_election_namespace or os.environ.get("POD_NAMESPACE") or "default",
        leader_election_id=leader_election_id, lease_duration=lease_duration, renew_deadline=renew_deadline,
        retry_period=retry_period, mn_cluster_role=mn_cluster_role, resync_interval=resync_interval,
        status_interval=status_interval, idle_status_interval=idle_status_interval)
    sys.exit(run(options))
