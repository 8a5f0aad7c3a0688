"""`zstack-cli`: hosts, VMs, jobs and the ring of the ZStack management nodes, over their REST API.

Exit codes: 0 success; 1 the job failed, timed out, a pinged host did not answer, or the MN could not
be reached (or answered 5xx); 2 bad input (a usage error, or the API answered 4xx); 130 interrupted while
waiting (the job goes on).

Every command that starts a job sends a fresh Idempotency-Key and, when the answer is lost or the MN
answers 503/429, sends the same request again with the same key (at most 5 times within 60 s, saying so
on stderr), so a retry never does the work twice. Lists show one page; `--all` fetches every page.
Text from the MNs is shown with control and bidi characters escaped (`\\x1b`, `\\u202e`).
"""

from __future__ import annotations

import sys
import uuid as uuid_module
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import click

from zstack_cli.client import (
    DEFAULT_URL,
    MAX_PAGE,
    ApiClient,
    JobFailed,
    JobTimeout,
    Json,
    RequestFailed,
    check_url,
    sends_token_in_clear,
)
from zstack_cli.output import escape, render

VM_STATES = ("Created", "Starting", "Running", "Stopping", "Stopped", "Migrating", "Destroyed")
JOB_STATES = ("Pending", "Running", "Succeeded", "Failed")
SPINNER = "|/-\\"
DEFAULT_PAGE = 100  # the API's default ?limit=
NOUNS = {"hosts": "hosts", "vms": "VMs", "jobs": "jobs"}


class CliError(click.ClickException):
    """An expected failure: printed as `error: <message>` without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {escape(self.format_message())}", err=True)


class UuidType(click.ParamType):
    """A resource UUID or job id: 32 hex characters (dashed or upper case is accepted and normalised)."""

    name = "uuid"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return uuid_module.UUID(str(value)).hex
        except ValueError:
            self.fail(f"{value!r} is not a UUID (32 hex characters, e.g. {uuid_module.uuid4().hex})", param, ctx)


UUID = UuidType()


class ApiGroup(click.Group):
    """Turns API errors anywhere below it into `error: ...` and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except RequestFailed as err:
            raise CliError(str(err), err.exit_code) from None
        except (JobFailed, JobTimeout) as err:
            raise CliError(str(err), 1) from None


@dataclass
class State:
    client: ApiClient
    output: str

    def show(self, data: Any, kind: str) -> None:
        click.echo(render(data, self.output, kind))


pass_state = click.make_pass_decorator(State)


def _check_url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _check_token(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not (value.isascii() and value.isprintable() and " " not in value):
        raise click.BadParameter("must be printable ASCII without spaces (the value is not shown)")
    return value or None


@click.group(cls=ApiGroup, context_settings={"max_content_width": 110, "help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zstack-k8s", prog_name="zstack-cli")
@click.option("--url", envvar="ZSTACK_API_URL", show_envvar=True, default=DEFAULT_URL, show_default=True,
              callback=_check_url, help="Base URL of any MN's API")
@click.option("--token", envvar="ZSTACK_API_TOKEN", show_envvar=True, default=None, callback=_check_token,
              help="Bearer token (the MN's --api-token); never printed")
@click.option("--ca-file", envvar="ZSTACK_CA_FILE", show_envvar=True, default=None,
              type=click.Path(dir_okay=False), help="PEM CA bundle that an https --url is verified against "
              "(default: the system's trust store); the cluster's CA is ca.crt of its Secret <cluster>-api-tls")
@click.option("--tls-server-name", envvar="ZSTACK_TLS_SERVER_NAME", show_envvar=True, default=None,
              help="Name the MN's certificate must hold, when --url reaches it by another (a pod IP, a tunnel): "
              "e.g. <cluster>-api.<namespace>.svc")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--timeout", type=click.FloatRange(0, min_open=True), default=30.0, show_default=True,
              help="Seconds to wait for each HTTP answer")
@click.pass_context
def main(ctx: click.Context, url: str, token: str | None, ca_file: str | None, tls_server_name: str | None,
         output: str, timeout: float) -> None:
    """Manage the hosts and VMs of a ZStack cloud through any of its management nodes.

    Commands that start a job (add, create, start, ...) retry a lost answer with the same
    Idempotency-Key, so nothing is done twice; any request answered 503/429 is retried after its
    Retry-After. Lists print one page (100 rows); pass --all for every page or --limit N.

    An https --url is always verified (certificate and host name), against --ca-file if given.
    """
    try:
        client = ApiClient(url, token, timeout, on_retry=_warn, ca_file=ca_file or None,
                           server_name=tls_server_name or None)
    except ValueError as exc:  # the CA bundle cannot be read
        raise click.BadParameter(str(exc), param_hint="--ca-file / ZSTACK_CA_FILE") from None
    if token and sends_token_in_clear(url):
        _warn(f"warning: the token goes to {url} unencrypted (plain http); use an https --url, the MN's "
              "--tls-cert-file")
    ctx.obj = State(client, output)


def _warn(message: str) -> None:
    """A note on stderr (a retry, a truncated list), escaped like everything the MNs say."""
    click.echo(escape(message), err=True)


# -- jobs: waiting with a progress line ------------------------------------------------------------------


class StatusLine:
    """One stderr line rewritten in place (a progress display), shown only when stderr is a terminal."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.width = 0

    def show(self, line: str) -> None:
        if not self.enabled:
            return
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


class Progress(StatusLine):
    """`<spinner> job <id> <operation> <state> <elapsed>s` while a job is waited for."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self.ticks = 0

    def update(self, job: Json, elapsed: float) -> None:
        self.ticks += 1
        self.show(f"{SPINNER[self.ticks % len(SPINNER)]} job {job.get('id')} {job.get('operation')} "
                  f"{job.get('state')} {elapsed:.0f}s")


def wait_options(func: Callable[..., Any]) -> Callable[..., Any]:
    func = click.option("--wait-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
                        help="Give up waiting for the job after this many seconds (exit 1)")(func)
    return click.option("--wait/--no-wait", default=True, show_default=True,
                        help="Wait for the job to finish, or print the accepted job at once")(func)


def finish(state: State, job: Json, wait: bool, wait_timeout: float) -> None:
    """Print the job: at once (--no-wait) or once terminal; a Failed job exits 1 with its error."""
    if not wait:
        state.show(job, "job")
        return
    progress = Progress()
    # A TTY gets a fresh progress line every second; otherwise fewer, longer polls (they end when the job does).
    poll = 1 if progress.enabled else 10
    try:
        done = state.client.wait_job(job, timeout=wait_timeout, poll=poll, on_progress=progress.update)
    except (JobFailed, JobTimeout) as err:
        progress.clear()
        state.show(err.job, "job")
        raise CliError(str(err), 1) from None
    except KeyboardInterrupt:
        progress.clear()
        raise CliError(f"interrupted; job {job.get('id')} goes on: follow it with zstack-cli jobs wait {job.get('id')}",
                       130) from None
    progress.clear()
    state.show(done, "job")


# -- lists: one page, or every page with a progress line -------------------------------------------------


class PageProgress(StatusLine):
    """`fetched <n> <things> ...` while --all walks the pages."""

    def __init__(self, noun: str, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self.noun = noun

    def update(self, fetched: int) -> None:
        self.show(f"fetched {fetched} {self.noun} ...")


def list_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--limit and --all for a list command."""
    func = click.option("--all", "all_pages", is_flag=True, default=False,
                        help="Fetch every page (following the API's continue token), with progress on stderr "
                             "when it is a terminal")(func)
    return click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=None,
                        help=f"Rows per page, 1-{MAX_PAGE} [default: {DEFAULT_PAGE}]; without --all only the "
                             "first page is shown")(func)


def show_list(state: State, kind: str, limit: int | None, all_pages: bool, filters: Json | None = None) -> None:
    """Print the first page of a list (with a note on stderr if more remain) or, with --all, every page."""
    noun, filters = NOUNS[kind], filters or {}
    if all_pages:
        progress = PageProgress(noun)
        try:
            rows = state.client.list_all(kind, limit, on_page=progress.update, **filters)
        finally:
            progress.clear()
        state.show(rows, kind)
        return
    page = state.client.list_page(kind, limit, **filters)
    state.show(page.rows, kind)
    if page.next_token is not None:
        _warn(f"note: showing the first {len(page.rows)} {noun}; more remain. Pass --all for every page, or "
              f"--limit N (up to {MAX_PAGE}) for a bigger page")


@main.group(cls=ApiGroup)
def jobs() -> None:
    """Jobs: the durable record of every long operation."""


@jobs.command("get")
@click.argument("job_id", type=UUID)
@pass_state
def jobs_get(state: State, job_id: str) -> None:
    """Show one job."""
    state.show(state.client.get_job(job_id), "job")


@jobs.command("list")
@click.option("--resource", "resource_uuid", type=UUID, default=None, help="Only jobs on this resource")
@click.option("--state", "job_state", type=click.Choice(JOB_STATES, case_sensitive=False), default=None)
@list_options
@pass_state
def jobs_list(state: State, resource_uuid: str | None, job_state: str | None, limit: int | None,
              all_pages: bool) -> None:
    """List jobs, newest first: the first page (100), or every page with --all."""
    show_list(state, "jobs", limit, all_pages, {"resource_uuid": resource_uuid,
                                                "state": _canonical(job_state, JOB_STATES)})


@jobs.command("wait")
@click.argument("job_id", type=UUID)
@click.option("--wait-timeout", type=click.FloatRange(0, min_open=True), default=600.0, show_default=True,
              help="Give up after this many seconds (exit 1)")
@pass_state
def jobs_wait(state: State, job_id: str, wait_timeout: float) -> None:
    """Wait until a job succeeds (exit 0) or fails (exit 1, printing its error)."""
    finish(state, state.client.get_job(job_id), True, wait_timeout)


def _canonical(value: str | None, choices: tuple[str, ...]) -> str | None:
    """The API's spelling of a case-insensitive choice."""
    if value is None:
        return None
    return next(c for c in choices if c.lower() == value.lower())


# -- hosts -------------------------------------------------------------------------------------------------


@main.group(cls=ApiGroup)
def hosts() -> None:
    """Hosts (simulated hypervisors) and their capacity."""


@hosts.command("list")
@list_options
@pass_state
def hosts_list(state: State, limit: int | None, all_pages: bool) -> None:
    """List hosts by UUID: the first page (100), or every page with --all."""
    show_list(state, "hosts", limit, all_pages)


@hosts.command("get")
@click.argument("host_uuid", type=UUID)
@pass_state
def hosts_get(state: State, host_uuid: str) -> None:
    """Show one host."""
    state.show(state.client.get_host(host_uuid), "host")


@hosts.command("add")
@click.argument("name")
@click.option("--cpu", type=click.IntRange(1), required=True, help="CPU capacity in cores")
@click.option("--memory", type=click.IntRange(1), required=True, help="Memory capacity in MiB")
@click.option("--uuid", "host_uuid", type=UUID, default=None, help="Choose the new host's UUID")
@wait_options
@pass_state
def hosts_add(state: State, name: str, cpu: int, memory: int, host_uuid: str | None, wait: bool,
              wait_timeout: float) -> None:
    """Add a host called NAME."""
    finish(state, state.client.add_host(name, cpu, memory, host_uuid), wait, wait_timeout)


@hosts.command("delete")
@click.argument("host_uuid", type=UUID)
@wait_options
@pass_state
def hosts_delete(state: State, host_uuid: str, wait: bool, wait_timeout: float) -> None:
    """Delete a host (the job fails with host_has_vms while VMs are placed on it)."""
    finish(state, state.client.delete_host(host_uuid), wait, wait_timeout)


@hosts.command("reconnect")
@click.argument("host_uuid", type=UUID)
@wait_options
@pass_state
def hosts_reconnect(state: State, host_uuid: str, wait: bool, wait_timeout: float) -> None:
    """Reconnect a host."""
    finish(state, state.client.reconnect_host(host_uuid), wait, wait_timeout)


@hosts.command("ping")
@click.argument("host_uuid", type=UUID)
@pass_state
def hosts_ping(state: State, host_uuid: str) -> None:
    """Ping a host now, through the MN that tracks it (exit 1 if it does not answer)."""
    answer = state.client.ping_host(host_uuid)
    state.show(answer, "ping")
    if not answer.get("reachable"):
        raise CliError(answer.get("error") or f"host {host_uuid} did not answer the ping", 1)


# -- VMs ---------------------------------------------------------------------------------------------------


@main.group(cls=ApiGroup)
def vms() -> None:
    """VM instances."""


@vms.command("list")
@click.option("--state", "vm_state", type=click.Choice(VM_STATES, case_sensitive=False), default=None)
@click.option("--host", "host_uuid", type=UUID, default=None, help="Only VMs placed on this host")
@list_options
@pass_state
def vms_list(state: State, vm_state: str | None, host_uuid: str | None, limit: int | None, all_pages: bool) -> None:
    """List VMs by UUID: the first page (100), or every page with --all."""
    show_list(state, "vms", limit, all_pages, {"state": _canonical(vm_state, VM_STATES), "host_uuid": host_uuid})


@vms.command("get")
@click.argument("vm_uuid", type=UUID)
@pass_state
def vms_get(state: State, vm_uuid: str) -> None:
    """Show one VM."""
    state.show(state.client.get_vm(vm_uuid), "vm")


@vms.command("create")
@click.argument("name")
@click.option("--cpu", type=click.IntRange(1), required=True, help="Cores")
@click.option("--memory", type=click.IntRange(1), required=True, help="Memory in MiB")
@click.option("--uuid", "vm_uuid", type=UUID, default=None, help="Choose the new VM's UUID")
@click.option("--host", "host_uuid", type=UUID, default=None, help="Place it on this host")
@wait_options
@pass_state
def vms_create(state: State, name: str, cpu: int, memory: int, vm_uuid: str | None, host_uuid: str | None,
               wait: bool, wait_timeout: float) -> None:
    """Create a VM called NAME: allocate a host, then start it."""
    finish(state, state.client.create_vm(name, cpu, memory, vm_uuid, host_uuid), wait, wait_timeout)


def _vm_action(action: str, summary: str) -> None:
    @vms.command(action, help=summary)
    @click.argument("vm_uuid", type=UUID)
    @wait_options
    @pass_state
    def command(state: State, vm_uuid: str, wait: bool, wait_timeout: float) -> None:
        finish(state, state.client.vm_action(vm_uuid, action), wait, wait_timeout)


_vm_action("start", "Start a VM.")
_vm_action("stop", "Stop a VM.")
_vm_action("reboot", "Reboot a VM.")
_vm_action("destroy", "Destroy a VM (frees its capacity).")


@vms.command("migrate")
@click.argument("vm_uuid", type=UUID)
@click.option("--host", "host_uuid", type=UUID, default=None, help="Target host (default: the allocator picks)")
@wait_options
@pass_state
def vms_migrate(state: State, vm_uuid: str, host_uuid: str | None, wait: bool, wait_timeout: float) -> None:
    """Migrate a VM to another host."""
    body = {"host_uuid": host_uuid} if host_uuid else {}
    finish(state, state.client.vm_action(vm_uuid, "migrate", body), wait, wait_timeout)


# -- the ring ----------------------------------------------------------------------------------------------


@main.group(cls=ApiGroup, invoke_without_command=True)
@click.pass_context
def ring(ctx: click.Context) -> None:
    """The MN ring: its members and epoch (or, with `owner`, who owns a resource)."""
    if ctx.invoked_subcommand is None:
        state = ctx.find_object(State)
        state.show(state.client.ring(), "ring")


@ring.command("owner")
@click.argument("resource_uuid", type=UUID)
@pass_state
def ring_owner(state: State, resource_uuid: str) -> None:
    """Which MN owns a resource."""
    state.show(state.client.owner(resource_uuid), "owner")

