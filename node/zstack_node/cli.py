"""`zstack-node`: run one management node."""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import socket

import click

from zstack_kube.errors import KubeError
from zstack_kube.login import namespace
from zstack_node.cloud.services import SERVICES as CLOUD_SERVICES
from zstack_node.cloud.settings import CloudSettings
from zstack_node.config import Settings, default, url_setting
from zstack_node.errors import ConfigError
from zstack_node.http import build_app, serve
from zstack_node.node import ManagementNode
from zstack_node.service import Service
from zstack_node.tls import ServerTls

log = logging.getLogger("zstack_node")


def load_service(spec: str) -> type[Service]:
    """Import `package.module:ClassName` and check that it is a Service."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise click.BadParameter(f"{spec!r} must look like package.module:ClassName", param_hint="--service")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {spec!r}: {exc}", param_hint="--service") from None
    if not (isinstance(cls, type) and issubclass(cls, Service) and getattr(cls, "name", None)):
        raise click.BadParameter(f"{spec!r} is not a Service subclass with a name", param_hint="--service")
    return cls


def _opt(name: str, *dest: str, env: str | None = None, **kwargs):  # noqa: ANN202 - a click decorator
    """A flag with its env var; a setting's default comes from the Settings dataclass, its one home."""
    env = env or "ZSTACK_" + name.replace("-", "_").upper()
    field = name.replace("-", "_")
    if field in Settings.__dataclass_fields__ and "default" not in kwargs and not kwargs.get("required"):
        kwargs["default"] = default(field)
    return click.option(f"--{name}", *dest, envvar=env, show_envvar=True, show_default=True, **kwargs)


@click.command(context_settings={"max_content_width": 110})
@click.version_option(package_name="zstack-k8s", prog_name="zstack-node")
@_opt("broker-url", default=None, help="RabbitMQ URL, amqp://user:pass@host:5672/%2F (or --broker-url-file)")
@_opt("broker-url-file", help="File holding the RabbitMQ URL (a mounted Secret: the password stays out of the "
                              "environment)")
@_opt("database-url", default=None, help="PostgreSQL URL, postgresql://user:pass@host:5432/zstack (or "
                                         "--database-url-file)")
@_opt("database-url-file", help="File holding the PostgreSQL URL")
@_opt("http-bind", help="Address of the HTTP port (API, health, metrics)")
@_opt("http-port", type=click.IntRange(0, 65535), help="The HTTP port")
@_opt("heartbeat-interval", type=float, help="Seconds between heartbeats")
@_opt("heartbeat-timeout", type=float, help="Seconds without a heartbeat before eviction")
@_opt("lease-duration", type=float, help="Kubernetes Lease duration in seconds")
@_opt("ring-vnodes", type=int, help="Virtual nodes per MN on the hash ring")
@_opt("call-timeout", type=float, help="Default deadline of a bus call, seconds")
@_opt("cluster", help="Name of the ZStackCluster this MN belongs to")
@_opt("hostname", default=None, help="Name recorded beside the MN UUID (default: the host or pod name)")
@_opt("advertise-address", help="Address other MNs and clients use to reach this MN's HTTP port")
@_opt("service", "services", env="ZSTACK_SERVICES", multiple=True,
      help="Extra service to host, as package.module:ClassName")
@_opt("log-level", default="INFO",
      type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@_opt("api-token", help="Bearer token the HTTP API requires (visible in the environment: prefer --api-token-file)")
@_opt("api-token-file", help="File of the bearer token(s), one per line, two during a rotation; read again when it "
                             "changes")
@_opt("tls-cert-file", help="PEM certificate (and its chain) of the HTTP port, which then serves HTTPS only; with "
                            "--tls-key-file. Read again when it changes")
@_opt("tls-key-file", help="PEM private key of --tls-cert-file (unencrypted)")
@_opt("kubernetes", type=click.Choice(["auto", "on", "off"]),
      help="Lease membership: auto is on when POD_NAME is set")
@_opt("pod-name", env="POD_NAME", help="This MN's pod (downward API): the name of its Lease")
@_opt("pod-namespace", env="POD_NAMESPACE",
      help="Namespace of the pod and its Lease (default: the ServiceAccount's namespace)")
def main(services: tuple[str, ...], log_level: str, hostname: str | None, **options: object) -> None:
    """Run one ZStack management node: every service, one copy of the hash ring."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pika").setLevel(logging.WARNING)
    hostname = hostname or options.get("pod_name") or socket.gethostname()  # type: ignore[assignment]
    try:
        for name in ("broker_url", "database_url"):
            options[name] = url_setting(name, options.pop(name), options.pop(f"{name}_file"))  # type: ignore[arg-type]
        settings = Settings(hostname=hostname, services=services, cloud=CloudSettings.from_env(),
                            **options).validate()  # type: ignore[arg-type]
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if settings.leases_enabled:
        try:
            namespace(settings.pod_namespace)  # fail now, not after the database answers
        except KubeError as exc:
            raise click.UsageError(str(exc)) from None
    classes = [*CLOUD_SERVICES, *(load_service(spec) for spec in services)]
    try:
        server_tls = ServerTls(settings.tls_cert_file, settings.tls_key_file) if settings.tls_cert_file else None
    except ConfigError as exc:  # the files changed since validate()
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(run(settings, classes, server_tls))
    except KubeError as exc:
        raise click.ClickException(str(exc)) from None


async def run(settings: Settings, classes: list[type[Service]], server_tls: ServerTls | None = None) -> None:
    """Start the node and its HTTP port (HTTPS with `server_tls`); leave gracefully on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    if hasattr(asyncio, "eager_task_factory"):  # Python 3.12+: a handler that never waits costs no loop pass
        loop.set_task_factory(asyncio.eager_task_factory)
    node = ManagementNode(settings, classes)
    host = settings.advertise_address or settings.hostname
    node.address = f"{host}:{settings.http_port}"
    runner = await serve(build_app(node), settings.http_bind, settings.http_port,
                         server_tls.context if server_tls else None)
    watch = asyncio.create_task(server_tls.watch()) if server_tls else None
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if server_tls:
        log.info("HTTPS on %s:%d; starting", settings.http_bind, settings.http_port)
    else:
        log.warning("HTTP on %s:%d without TLS: the API and its bearer token travel unencrypted (pass "
                    "--tls-cert-file and --tls-key-file for HTTPS); starting", settings.http_bind, settings.http_port)
    starting = asyncio.create_task(node.start())
    await asyncio.wait({starting, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if starting.done():
        starting.result()
        await stop.wait()
    else:
        starting.cancel()
    log.info("received a stop signal")
    await node.leave()
    if watch:
        watch.cancel()
    await runner.cleanup()
