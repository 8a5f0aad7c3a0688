"""``zstack-dev``: build the tools and images, and run a local Kubernetes whose node runs containers."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from zstack_devcluster import controlplane, images, tools
from zstack_devcluster import demo as demo_mod
from zstack_devcluster.errors import DevclusterError
from zstack_devcluster.layout import DEFAULT_DIR, DIR_ENV, Layout, resolve_dir

_dir_option = click.option(
    "--dir", "dir_", type=click.Path(file_okay=False, path_type=Path), default=None, envvar=DIR_ENV,
    help=f"devcluster directory (default: ${DIR_ENV}, else {DEFAULT_DIR}/ in the current directory).",
)


def _fail(err: DevclusterError) -> None:
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Local Kubernetes: etcd, kube-apiserver, controller-manager, scheduler, and a node of containers."""


@main.command("tools")
def tools_cmd() -> None:
    """Build (once) or locate the pinned etcd, Kubernetes and helm binaries; print their paths."""
    try:
        paths = tools.ensure_tools()
    except DevclusterError as err:
        _fail(err)
    for name, path in paths.items():
        click.echo(f"{name}\t{path}")


@main.command("images")
@click.option("--only", multiple=True, type=click.Choice(images.IMAGES),
              help="Build only this image (repeatable); default: every one.")
@click.option("--rebuild", is_flag=True, help="Build even the images whose inputs are unchanged.")
def images_cmd(only: tuple[str, ...], rebuild: bool) -> None:
    """Build the node and operator images, and those of the managed RabbitMQ and PostgreSQL, from Debian
    (mmdebstrap, buildah), without Docker Hub; an image whose inputs are unchanged is not built again.
    `zstack-dev up` and `zstack-dev demo up` import them into a container node."""
    try:
        built = images.build(only=only or None, rebuild=rebuild)
    except DevclusterError as err:
        _fail(err)
    for image in built:
        click.echo(f"{image.name}\t{image.archive}")


@main.command()
@_dir_option
@click.option("--node", type=click.Choice([controlplane.NODE_KIND]), default=controlplane.NODE_KIND,
              show_default=True,
              help="The node: containerd, runc, a real kubelet, kube-proxy, CoreDNS and kube-router in a network "
                   "namespace of its own (needs root); the only kind.")
def up(dir_: Path | None, node: str) -> None:
    """Start the devcluster (no-op when it already runs) and wait until it is ready."""
    root = resolve_dir(dir_)
    try:
        res = controlplane.up(root, node=node)
    except DevclusterError as err:
        _fail(err)
    verb = "started " + ", ".join(res.started) if res.started else "already running"
    click.echo(f"devcluster {verb} in {res.seconds:.1f}s", err=True)
    click.echo(f"kubeconfig: {res.kubeconfig}", err=True)
    click.echo(f"use it with: eval \"$(zstack-dev env{_dir_arg(dir_)})\"", err=True)


def _dir_arg(dir_: Path | None) -> str:
    return f" --dir {shlex.quote(str(dir_))}" if dir_ else ""


@main.command()
@_dir_option
@click.option("--purge", is_flag=True, help="Also delete the cluster's data, certificates and logs.")
def down(dir_: Path | None, purge: bool) -> None:
    """Stop every process `up` started (by pid, whole process groups, then their pods)."""
    try:
        controlplane.down(resolve_dir(dir_), purge=purge)
    except DevclusterError as err:
        _fail(err)


@main.command()
@_dir_option
def status(dir_: Path | None) -> None:
    """Show which components run (exit status 0 only when all are running and healthy)."""
    root = resolve_dir(dir_)
    rows = controlplane.status(root)
    click.echo(f"devcluster in {root}")
    for r in rows:
        state = "healthy" if r.healthy else "running" if r.running else "stopped"
        pid = str(r.pid) if r.running else "-"
        ports = " ".join(f"{k}={v}" for k, v in r.ports.items())
        click.echo(f"  {r.name:<24} {state:<8} pid {pid:<8} {ports}")
    if not all(r.healthy for r in rows):
        sys.exit(1)


@main.command()
@_dir_option
def env(dir_: Path | None) -> None:
    """Print shell exports (KUBECONFIG, PATH with the tools): eval "$(zstack-dev env)"."""
    lay = Layout(resolve_dir(dir_))
    if not lay.kubeconfig.exists():
        click.echo(f"warning: {lay.kubeconfig} does not exist yet; run `zstack-dev up` first", err=True)
    if tools.missing_tools():
        click.echo("warning: some tools are not built; run `zstack-dev tools` first", err=True)
    click.echo(f"export KUBECONFIG={shlex.quote(str(lay.kubeconfig))}")
    click.echo(f"export PATH={shlex.quote(str(tools.bin_dir()))}:\"$PATH\"")


@main.group()
def demo() -> None:
    """The operator (Helm) and a ZStackCluster of MN pods on the devcluster, with private RabbitMQ/PostgreSQL."""


@demo.command("up")
@_dir_option
@click.option("--replicas", type=click.IntRange(1, 20), default=3, show_default=True, help="How many MNs to run.")
def demo_up(dir_: Path | None, replicas: int) -> None:
    """Start the demo (idempotent) and wait until `kubectl get zsc` shows every MN in one ring."""
    try:
        ready = demo_mod.up(resolve_dir(dir_), replicas)
    except demo_mod.DemoError as err:
        click.secho(f"error: {err}", fg="red", err=True)
        sys.exit(1)
    demo_mod.print_next_steps(ready, _dir_arg(dir_))


@demo.command("down")
@_dir_option
def demo_down(dir_: Path | None) -> None:
    """Stop the demo: delete the ZStackCluster (MNs leave gracefully), uninstall the operator, stop the servers."""
    stopped = demo_mod.down(resolve_dir(dir_))
    click.echo("demo stopped" if stopped else "demo was not running", err=True)


if __name__ == "__main__":
    main()
