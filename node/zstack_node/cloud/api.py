"""The REST API on every MN: validate, write the job row, publish on api.portal, answer 202.

Routes, their validation and the OpenAPI document all come from routes.ROUTES. Whichever MN
takes a published message routes it by the ring to the resource's owner (create has no owner
yet and runs where it is taken); the result lands in the job row, so any MN answers a poll.
A host ping is synchronous instead: a bus call to the host's owner, answered with its reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web
from sqlalchemy.engine import Row

from zstack_node import metrics as node_metrics
from zstack_node.bus.cloudbus import BusError, RemoteError
from zstack_node.cloud import hosts, idempotency, metrics, paging, repo, vms
from zstack_node.cloud.idempotency import Claim, KeyTaken
from zstack_node.cloud.jobs import JOB_DONE_TOPIC, Database
from zstack_node.cloud.repo import DB_UNAVAILABLE, TERMINAL
from zstack_node.cloud.retention import Purger
from zstack_node.cloud.routes import ROUTES, Route, openapi_document
from zstack_node.cloud.sweeper import Sweeper
from zstack_node.cloud.tokens import ApiTokens
from zstack_node.cloud.validation import MAX_BODY, HttpError, check_query, check_uuid, parse_json
from zstack_node.errors import first_line
from zstack_node.ring import Ring, RingChange
from zstack_node.service import Service, ServiceContext

log = logging.getLogger(__name__)

Params = dict[str, Any]
_ROUTE_KEY: web.AppKey[dict[tuple[str, str], Route]] = web.AppKey("cloud_routes")
_CLAIM = "idempotency_claim"  # request key of the request's idempotency Claim
_POLL = 1.0  # seconds between DB polls of a waited job: a safety net, as its job.done event wakes the waiter
RETRY_AFTER = 2  # seconds a client is told to wait after a 503 (the broker or the database is away)


class ApiService(Service):
    """Serves /v1/hosts, /v1/vms, /v1/jobs and /v1/openapi.json; sweeps abandoned jobs; purges expired rows."""

    name = "api"

    def __init__(self, ctx: ServiceContext) -> None:
        super().__init__(ctx)
        self.db = Database(ctx)
        self.sweeper = Sweeper(ctx)
        self.purger = Purger(ctx)
        self.tokens = ApiTokens(ctx.settings.api_token, ctx.settings.api_token_file)
        self._waiters: dict[str, _Waiter] = {}
        self._long_polls = 0
        self.max_long_polls = ctx.settings.cloud.api_max_long_polls
        self._document = openapi_document()
        ctx.bus.subscribe(JOB_DONE_TOPIC, self._on_job_done)
        metrics.initialise()
        node_metrics.child(node_metrics.CALL_SECONDS, hosts.SERVICE)  # the one bus call the API makes: host pings

    # ---- lifecycle -------------------------------------------------------------------------

    async def on_self_joined(self, ring: Ring) -> None:
        self.sweeper.start()
        self.purger.start()

    async def on_node_left(self, change: RingChange) -> None:
        self.sweeper.wake()

    async def on_self_dead(self) -> None:
        await self.sweeper.stop()
        await self.purger.stop()

    def _on_job_done(self, _topic: str, body: dict[str, Any]) -> None:
        waiter = self._waiters.get(str(body.get("id")))
        if waiter is not None:
            waiter.job = body.get("job")  # the terminal job: no read needed to answer
            waiter.done.set()

    # ---- HTTP plumbing -----------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        app.middlewares.append(_json_errors)
        for route in ROUTES:
            if route.handler:
                app.router.add_route(route.method, route.path, self._endpoint(route))

    def _endpoint(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        handler: Callable[[web.Request, Params], Awaitable[web.StreamResponse]] = getattr(self, route.handler)

        async def endpoint(request: web.Request) -> web.StreamResponse:
            status = 500
            try:
                if route.auth:
                    self._authenticate(request)
                params: Params = {name: check_uuid(request.match_info[name], name) for name in route.path_params}
                params.update(check_query(request.query.items(), route.query))
                if route.body is not None:
                    params["body"] = await _read_body(request, route)
                replay = await self._idempotent(request, route, params)
                response = replay or await handler(request, params)
                status = response.status
                return response
            except HttpError as exc:
                status = exc.status
                return _error(exc)
            except DB_UNAVAILABLE as exc:
                status = 503
                log.warning("%s %s: database unavailable: %s", request.method, request.path, first_line(exc))
                return _error(HttpError(503, "unavailable", f"the database is unavailable: {first_line(exc)}",
                                        retry_after=RETRY_AFTER))
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.path)
                return _error(HttpError(500, "internal_error", f"internal error ({type(exc).__name__}); the MN's log "
                                                              "has the details"))
            finally:
                metrics.API_REQUESTS.labels(route.operation, str(status)).inc()

        return endpoint

    async def _idempotent(self, request: web.Request, route: Route, params: Params) -> web.Response | None:
        """The earlier answer when this POST/DELETE repeats an accepted request's Idempotency-Key; else None,
        with the request's claim kept for `_accept`."""
        if route.method not in ("POST", "DELETE"):
            return None
        claim = idempotency.claim_of(request.headers.getall(idempotency.HEADER, []), route.operation_id, params)
        if claim is None or route.success[0] != 202:  # a ping is a read: nothing to do twice
            return None
        stored = await self.db(idempotency.find, claim.key)
        if stored is None:
            request[_CLAIM] = claim
            return None
        return await self._replay(claim, stored)

    async def _replay(self, claim: Claim, stored: Row) -> web.Response:
        idempotency.check_same(claim, stored)
        job = await self.db(repo.get_job, stored.job_id)
        if job is None:
            raise HttpError(409, "conflict", f"{idempotency.HEADER}: the job of {claim.key!r} ({stored.job_id}) was "
                                             "purged; use a new key", idempotency.HEADER)
        metrics.IDEMPOTENT_REPLAYS.inc()
        return _accepted(job, replayed=True)

    def _authenticate(self, request: web.Request) -> None:
        if not self.tokens.configured:
            raise HttpError(401, "no_token_configured", "this MN has no API token: set --api-token-file / "
                                                        "ZSTACK_API_TOKEN_FILE (or --api-token) on the MN")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.tokens.accepts(given.strip()):
            raise HttpError(401, "unauthorized", "missing or wrong bearer token in the Authorization header")

    # ---- hosts -------------------------------------------------------------------------------

    async def list_hosts(self, _request: web.Request, params: Params) -> web.Response:
        after = paging.resume(params, "hosts", {}, 1)
        limit = paging.limit_of(params)
        rows = await self.db(repo.list_hosts, after, limit + 1)
        return web.json_response(paging.page("hosts", rows, limit, {}, repo.host_dict, lambda r: (r.uuid,)))

    async def get_host(self, _request: web.Request, params: Params) -> web.Response:
        row = await self.db(repo.get_host, params["uuid"])
        if row is None:
            raise _not_found("host", params["uuid"])
        return web.json_response(repo.host_dict(row))

    async def add_host(self, request: web.Request, params: Params) -> web.Response:
        body = params["body"]
        given = body.pop("uuid", None)
        host_uuid = given or repo.new_uuid()
        if given is not None and await self.db(repo.get_host, host_uuid) is not None:  # a new uuid4 is unused
            raise HttpError(409, "already_exists", f"uuid: host {host_uuid} already exists", "uuid")
        return await self._accept(request, "host.add", host_uuid, body, hosts.SERVICE, hosts.MESSAGE, host_uuid)

    async def delete_host(self, request: web.Request, params: Params) -> web.Response:
        host_uuid = params["uuid"]
        host, busy = await self.db(_with_open_jobs, repo.get_host, host_uuid)
        if host is None and not busy:
            raise _not_found("host", host_uuid)
        if host is not None and not busy and host.cpu_used + host.memory_used > 0:
            raise HttpError(409, "host_has_vms", f"host {host_uuid} has VMs placed on it: destroy or migrate them "
                                                "first", "uuid")
        return await self._accept(request, "host.delete", host_uuid, {}, hosts.SERVICE, hosts.MESSAGE, host_uuid)

    async def reconnect_host(self, request: web.Request, params: Params) -> web.Response:
        host_uuid = params["uuid"]
        host, busy = await self.db(_with_open_jobs, repo.get_host, host_uuid)
        if host is None and not busy:
            raise _not_found("host", host_uuid)
        return await self._accept(request, "host.reconnect", host_uuid, {}, hosts.SERVICE, hosts.MESSAGE, host_uuid)

    async def ping_host(self, _request: web.Request, params: Params) -> web.Response:
        """Ping a host now through the MN that tracks it (the ring owner) and answer with its reply.

        The call is idempotent (a ping is a read), so it is re-sent if the owner leaves meanwhile.
        """
        host_uuid = params["uuid"]
        if await self.db(repo.get_host, host_uuid) is None:
            raise _not_found("host", host_uuid)
        bus = self.ctx.bus
        try:
            reply = await bus.call(hosts.SERVICE, hosts.PING, {"host": host_uuid}, resource=host_uuid,
                                   idempotent=True, timeout=bus.call_timeout)
        except RemoteError as exc:
            if exc.code == "not_found":  # deleted between our read and the owner's
                raise _not_found("host", host_uuid) from None
            raise self._ping_unavailable(host_uuid, exc) from None
        except BusError as exc:
            raise self._ping_unavailable(host_uuid, exc) from None
        return web.json_response(reply)

    def _ping_unavailable(self, host_uuid: str, exc: BusError) -> HttpError:
        ring = self.ctx.ring
        owner = f"MN {ring.owner(host_uuid)}" if ring.members else "its owner MN (this MN has no ring)"
        log.warning("ping of host %s through %s failed: %s: %s", host_uuid, owner, exc.code, first_line(exc))
        if isinstance(exc, RemoteError):  # the owner answered with an error: its text stays in its log
            return HttpError(503, "unavailable", f"the ping of host {host_uuid} failed on {owner}, the MN that "
                                                f"tracks it ({exc.code}); see that MN's log", retry_after=RETRY_AFTER)
        return HttpError(503, "unavailable", f"the ping of host {host_uuid} through {owner}, the MN that tracks "
                                            f"it, failed ({exc.code}: {first_line(exc)}); retry in a few seconds "
                                            "(the ring may be changing)", retry_after=RETRY_AFTER)

    # ---- VMs ---------------------------------------------------------------------------------

    async def list_vms(self, _request: web.Request, params: Params) -> web.Response:
        filters = {"state": params.get("state"), "host_uuid": params.get("host_uuid")}
        after = paging.resume(params, "vms", filters, 1)
        limit = paging.limit_of(params)
        rows = await self.db(repo.list_vms, filters["state"], filters["host_uuid"], after, limit + 1)
        return web.json_response(paging.page("vms", rows, limit, filters, repo.vm_dict, lambda r: (r.uuid,)))

    async def get_vm(self, _request: web.Request, params: Params) -> web.Response:
        row = await self.db(repo.get_vm, params["uuid"])
        if row is None:
            raise _not_found("VM", params["uuid"])
        return web.json_response(repo.vm_dict(row))

    async def create_vm(self, request: web.Request, params: Params) -> web.Response:
        body = params["body"]
        given = body.pop("uuid", None)
        vm_uuid = given or repo.new_uuid()
        if given is not None and await self.db(repo.get_vm, vm_uuid) is not None:  # a new uuid4 is unused
            raise HttpError(409, "already_exists", f"uuid: VM {vm_uuid} already exists", "uuid")
        pinned = body.get("host_uuid")
        if pinned is not None and await self.db(repo.get_host, pinned) is None:
            raise HttpError(404, "not_found", f"host_uuid: host {pinned} does not exist", "host_uuid")
        # No owner yet: the message has no resource, so the MN that takes it allocates and starts.
        return await self._accept(request, "vm.create", vm_uuid, body, vms.SERVICE, vms.MESSAGE, None)

    async def delete_vm(self, request: web.Request, params: Params) -> web.Response:
        return await self._vm_action(request, "destroy", params["uuid"], {})

    async def vm_action(self, request: web.Request, params: Params) -> web.Response:
        action = request.path.rsplit("/", 1)[1]
        return await self._vm_action(request, action, params["uuid"], params.get("body") or {})

    async def _vm_action(self, request: web.Request, action: str, vm_uuid: str, body: dict[str, Any]
                         ) -> web.Response:
        vm, busy = await self.db(_with_open_jobs, repo.get_vm, vm_uuid)
        if vm is None and not busy:
            raise _not_found("VM", vm_uuid)
        if vm is not None and (vm.state == "Destroyed" or not busy):
            reason = vms.invalid_transition(action, vm.state)
            if reason:
                raise HttpError(409, "invalid_state", reason, None)
        pinned = body.get("host_uuid")
        if pinned is not None:
            if await self.db(repo.get_host, pinned) is None:
                raise HttpError(404, "not_found", f"host_uuid: host {pinned} does not exist", "host_uuid")
            if vm is not None and not busy and vm.host_uuid == pinned:
                raise HttpError(409, "invalid_state", f"host_uuid: VM {vm_uuid} already runs on host {pinned}",
                               "host_uuid")
        return await self._accept(request, f"vm.{action}", vm_uuid, body, vms.SERVICE, vms.MESSAGE, vm_uuid)

    # ---- jobs --------------------------------------------------------------------------------

    async def list_jobs(self, _request: web.Request, params: Params) -> web.Response:
        filters = {"resource_uuid": params.get("resource_uuid"), "state": params.get("state")}
        before = paging.resume(params, "jobs", filters, 2)
        limit = paging.limit_of(params)
        rows = await self.db(repo.list_jobs, filters["resource_uuid"], filters["state"], before, limit + 1)
        return web.json_response(paging.page("jobs", rows, limit, filters, repo.job_dict, repo.job_key))

    async def get_job(self, _request: web.Request, params: Params) -> web.Response:
        job_id = params["id"]
        wait = float(params.get("wait", 0))
        if wait > 0 and self._long_polls >= self.max_long_polls:
            metrics.LONG_POLLS_REFUSED.inc()
            raise HttpError(429, "too_many_waits", f"wait: {self._long_polls} requests already wait on this MN (the "
                                                   f"limit is {self.max_long_polls}); retry after the delay, or poll "
                                                   "without wait", "wait", retry_after=1)
        deadline = time.monotonic() + wait
        # Watch before the first read: a job.done event arriving during the read must not be missed.
        with self._watching(job_id) as waiter, self._long_poll(wait > 0):
            row = await self.db(repo.get_job, job_id)
            if row is None:
                raise _not_found("job", job_id)
            job = repo.job_dict(row)
            while job["state"] not in TERMINAL and (left := deadline - time.monotonic()) > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.done.wait(), min(_POLL, left))
                if waiter.job is not None and waiter.job.get("state") in TERMINAL:
                    job = waiter.job
                else:  # no event yet (the poll is the safety net for a lost one), or one without the job
                    row = await self.db(repo.get_job, job_id)
                    job = repo.job_dict(row) if row is not None else job
        return web.json_response(job)

    @contextlib.contextmanager
    def _long_poll(self, waiting: bool) -> Iterator[None]:
        """Count a request that waits, against the MN's cap (each one holds a coroutine and polls the DB)."""
        self._long_polls += waiting
        metrics.LONG_POLLS.set(self._long_polls)
        try:
            yield
        finally:
            self._long_polls -= waiting
            metrics.LONG_POLLS.set(self._long_polls)

    @contextlib.contextmanager
    def _watching(self, job_id: str) -> Iterator[_Waiter]:
        """What this job's job.done event brings, shared by every request waiting on it."""
        waiter = self._waiters.setdefault(job_id, _Waiter())
        waiter.count += 1
        try:
            yield waiter
        finally:
            waiter.count -= 1
            if waiter.count == 0:
                del self._waiters[job_id]

    async def openapi(self, _request: web.Request, _params: Params) -> web.Response:
        return web.json_response(self._document)

    # ---- the accept path ---------------------------------------------------------------------

    async def _accept(self, request: web.Request, operation: str, resource_uuid: str, parameters: dict[str, Any],
                      service: str, message: str, route_by: str | None) -> web.Response:
        """Write the job row (with the request's idempotency key), publish its message (persistent,
        confirmed), and answer 202."""
        if not self.ctx.bus.connected:
            raise HttpError(503, "unavailable", "the broker is unreachable, so no new work is accepted; reads still "
                            "work. Retry after the delay", retry_after=RETRY_AFTER)
        if self.ctx.state == "suspended":
            raise HttpError(503, "unavailable", "this MN is suspended (it cannot heartbeat), so it accepts no new "
                            "work; retry, here or on another MN", retry_after=RETRY_AFTER)
        claim: Claim | None = request.get(_CLAIM)
        try:
            job = await self.db(_insert_job, operation, resource_uuid, parameters, claim)
        except KeyTaken:  # the same key arrived at the same time: answer with the request that stored it
            assert claim is not None
            stored = await self.db(idempotency.find, claim.key)
            if stored is None:
                raise HttpError(409, "conflict", f"{idempotency.HEADER}: {claim.key!r} is being used by a request "
                                                 "that failed meanwhile; retry", idempotency.HEADER) from None
            return await self._replay(claim, stored)
        try:
            await self.ctx.bus.send_api(service, message, {"job": job.id, "resource": resource_uuid},
                                         resource=route_by)
        except BusError as exc:
            error = {"code": "unavailable", "message": f"could not publish the job: {exc}"}
            if await self.db(_refuse_job, job.id, error):
                raise HttpError(503, "unavailable", f"the broker did not take job {job.id} ({exc}); the job is "
                                "marked Failed, nothing was changed", retry_after=RETRY_AFTER) from None
            job = await self.db(repo.get_job, job.id)  # someone took it after all: it was accepted
        return _accepted(job)


def _insert_job(conn: Any, operation: str, resource_uuid: str, parameters: dict[str, Any], claim: Claim | None
                ) -> Row:
    job = repo.insert_job(conn, operation, resource_uuid, parameters)
    if claim is not None:
        idempotency.store(conn, claim, job.id)
    return job


def _refuse_job(conn: Any, job_id: str, error: dict[str, Any]) -> bool:
    """Fail a job whose message was not published, and free its key so that a retry does the work."""
    if not repo.fail_unclaimed(conn, job_id, error):
        return False
    idempotency.forget(conn, job_id)
    return True


@dataclasses.dataclass
class _Waiter:
    """The requests waiting on one job: set `done` (with the terminal `job`) when its job.done event arrives."""

    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    job: dict[str, Any] | None = None
    count: int = 0


def _with_open_jobs(conn: Any, read: Callable[[Any, str], Row | None], uuid: str) -> tuple[Row | None, bool]:
    """The resource and whether jobs on it are open. Jobs first: a row read after "no open jobs" is
    final, while one read before could belong to a job that ended in between."""
    busy = repo.has_open_jobs(conn, uuid)
    return read(conn, uuid), busy


def _accepted(job: Row, replayed: bool = False) -> web.Response:
    headers = {"Location": f"/v1/jobs/{job.id}"}
    if replayed:
        headers[idempotency.REPLAYED] = "true"
    return web.json_response({"job": repo.job_dict(job)}, status=202, headers=headers)


def _not_found(kind: str, uuid: str) -> HttpError:
    return HttpError(404, "not_found", f"{kind} {uuid} does not exist", None)


def _error(exc: HttpError) -> web.Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    return web.json_response(exc.body(), status=exc.status, headers=headers or None)


async def _read_body(request: web.Request, route: Route) -> dict[str, Any]:
    """The checked JSON body: 413 past 64 KiB, 415 if not JSON, 400 naming the bad field."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise HttpError(413, "body_too_large", f"the body is {request.content_length} bytes; the limit is {MAX_BODY}")
    raw = bytearray()
    while chunk := await request.content.read(MAX_BODY + 1 - len(raw)):
        raw += chunk
        if len(raw) > MAX_BODY:
            raise HttpError(413, "body_too_large", f"the body is larger than the limit of {MAX_BODY} bytes")
    if raw.strip() and request.content_type != "application/json":
        raise HttpError(415, "unsupported_media_type",
                       f"the body must be application/json, got {request.content_type or 'no Content-Type'}")
    data = parse_json(bytes(raw))
    if data is None:
        if route.body_required:
            raise HttpError(400, "missing_body", "a JSON body is required", None)
        data = {}
    assert route.body is not None
    return route.body.check(data)


@web.middleware
async def _json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
    """Unknown /v1 paths and wrong methods answer in the API's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if not request.path.startswith("/v1/") or exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = (f"no such endpoint: {request.path}" if exc.status == 404
                   else f"{request.method} is not allowed on {request.path}" if exc.status == 405 else exc.reason)
        metrics.API_REQUESTS.labels("unknown", str(exc.status)).inc()
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return web.json_response({"error": {"code": code, "message": message, "field": None}}, status=exc.status,
                                 headers=headers)

