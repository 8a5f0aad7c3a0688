"""The REST API's route table and the OpenAPI 3 document built from it (so the two cannot drift).

Each `Route` names its handler, its body and query specs (which also validate requests), its
success response and the error answers it can give.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zstack_node.cloud import idempotency, paging
from zstack_node.cloud.schema import HOST_STATES, JOB_STATES, VM_STATES
from zstack_node.cloud.validation import UUID_RE, Body, Field

VM_ACTIONS = ("start", "stop", "reboot", "migrate", "destroy")


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: str  # ApiService method
    operation: str  # metric label and job operation family, e.g. "vm.start"
    operation_id: str
    summary: str
    success: tuple[int, str]  # status, component schema
    errors: tuple[int, ...] = ()
    body: Body | None = None
    body_required: bool = False
    query: tuple[Field, ...] = ()
    auth: bool = True

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(part[1:-1] for part in self.path.split("/") if part.startswith("{"))


HOST_CREATE = Body("HostCreate", (
    Field("name", "name", required=True, minimum=1, maximum=255, description="Host name (printable text)"),
    Field("cpu", "int", required=True, minimum=1, maximum=4096, description="CPU capacity in cores"),
    Field("memory", "int", required=True, minimum=1, maximum=16777216, description="Memory capacity in MiB"),
    Field("uuid", "uuid", description="UUID to give the host (default: a new one)"),
))
VM_CREATE = Body("VmCreate", (
    Field("name", "name", required=True, minimum=1, maximum=255, description="VM name (printable text)"),
    Field("cpu", "int", required=True, minimum=1, maximum=256, description="CPU cores"),
    Field("memory", "int", required=True, minimum=1, maximum=1048576, description="Memory in MiB"),
    Field("uuid", "uuid", description="UUID to give the VM (default: a new one)"),
    Field("host_uuid", "uuid", description="Place the VM on this host"),
))
VM_MIGRATE = Body("VmMigrate", (
    Field("host_uuid", "uuid", description="Target host (default: the allocator's choice)"),
))
NO_FIELDS = Body("Empty", ())

_ID_ERRORS = (400, 401, 404)
_WRITE_ERRORS = (400, 401, 404, 409, 413, 415, 422, 503)

ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/hosts", "list_hosts", "hosts.list", "listHosts", "List hosts by UUID, a page at a time",
          (200, "HostList"), (400, 401), query=paging.QUERY),
    Route("POST", "/v1/hosts", "add_host", "host.add", "addHost", "Add a host (job host.add)",
          (202, "JobAccepted"), (400, 401, 409, 413, 415, 422, 503), body=HOST_CREATE, body_required=True),
    Route("GET", "/v1/hosts/{uuid}", "get_host", "hosts.get", "getHost", "Get a host", (200, "Host"), _ID_ERRORS),
    Route("DELETE", "/v1/hosts/{uuid}", "delete_host", "host.delete", "deleteHost", "Delete a host (job host.delete)",
          (202, "JobAccepted"), _WRITE_ERRORS),
    Route("POST", "/v1/hosts/{uuid}/actions/reconnect", "reconnect_host", "host.reconnect", "reconnectHost",
          "Reconnect a host (job host.reconnect)", (202, "JobAccepted"), _WRITE_ERRORS, body=NO_FIELDS),
    Route("POST", "/v1/hosts/{uuid}/actions/ping", "ping_host", "host.ping", "pingHost",
          "Ping a host now, through the MN that tracks it; answers at once (no job)", (200, "HostPing"),
          (400, 401, 404, 413, 415, 503), body=NO_FIELDS),
    Route("GET", "/v1/vms", "list_vms", "vms.list", "listVms", "List VMs by UUID, a page at a time", (200, "VmList"),
          (400, 401), query=(Field("state", "enum", choices=VM_STATES), Field("host_uuid", "uuid"), *paging.QUERY)),
    Route("POST", "/v1/vms", "create_vm", "vm.create", "createVm", "Create and start a VM (job vm.create)",
          (202, "JobAccepted"), _WRITE_ERRORS, body=VM_CREATE, body_required=True),
    Route("GET", "/v1/vms/{uuid}", "get_vm", "vms.get", "getVm", "Get a VM", (200, "Vm"), _ID_ERRORS),
    Route("DELETE", "/v1/vms/{uuid}", "delete_vm", "vm.destroy", "deleteVm", "Destroy a VM (job vm.destroy)",
          (202, "JobAccepted"), _WRITE_ERRORS),
    *(Route("POST", f"/v1/vms/{{uuid}}/actions/{action}", "vm_action", f"vm.{action}", f"{action}Vm",
            f"{action.capitalize()} a VM (job vm.{action})", (202, "JobAccepted"), _WRITE_ERRORS,
            body=VM_MIGRATE if action == "migrate" else NO_FIELDS)
      for action in VM_ACTIONS),
    Route("GET", "/v1/jobs", "list_jobs", "jobs.list", "listJobs", "List jobs, newest first, a page at a time",
          (200, "JobList"), (400, 401),
          query=(Field("resource_uuid", "uuid"), Field("state", "enum", choices=JOB_STATES), *paging.QUERY)),
    Route("GET", "/v1/jobs/{id}", "get_job", "jobs.get", "getJob", "Get a job, optionally waiting for it to end",
          (200, "Job"), (*_ID_ERRORS, 429),
          query=(Field("wait", "number", minimum=0, maximum=60,
                       description="Seconds to wait for a terminal state"),)),
    Route("GET", "/v1/openapi.json", "openapi", "openapi", "getOpenApi", "This document", (200, "Document"),
          auth=False),
    # Served by the runtime (zstack_node.http); listed so that clients find the whole API here.
    Route("GET", "/v1/cluster/ring", "", "cluster.ring", "getRing", "The ring: members and epoch", (200, "Ring"),
          auth=False),
    Route("GET", "/v1/cluster/owner/{uuid}", "", "cluster.owner", "getOwner", "The MN that owns a resource UUID",
          (200, "Owner"), auth=False),
)

_TS = {"type": "string", "format": "date-time"}


def _page_of(kind: str, item: str) -> dict[str, Any]:
    return {"type": "object", "required": [kind], "properties": {
        kind: {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
        "continue": {"type": "string", "description": "Present while more rows remain: pass it as ?continue= "
                                                      "(with the same filters) for the next page"}}}


_UUID = {"type": "string", "pattern": UUID_RE.pattern}
_NULLABLE_UUID = {**_UUID, "nullable": True}
_INT = {"type": "integer"}

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["code", "message", "field"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "field": {"type": "string", "nullable": True}}}}},
    "Host": {"type": "object", "required": ["uuid", "name", "cpu_capacity", "cpu_used", "memory_capacity",
                                            "memory_used", "state", "version", "created_at"],
             "properties": {"uuid": _UUID, "name": {"type": "string"}, "cpu_capacity": _INT, "cpu_used": _INT,
                            "memory_capacity": _INT, "memory_used": _INT,
                            "state": {"type": "string", "enum": list(HOST_STATES)}, "version": _INT,
                            "created_at": _TS}},
    "Vm": {"type": "object", "required": ["uuid", "name", "cpu", "memory", "host_uuid", "state", "version",
                                          "created_at"],
           "properties": {"uuid": _UUID, "name": {"type": "string"}, "cpu": _INT, "memory": _INT,
                          "host_uuid": _NULLABLE_UUID, "state": {"type": "string", "enum": list(VM_STATES)},
                          "version": _INT, "created_at": _TS}},
    "Job": {"type": "object", "required": ["id", "operation", "resource_uuid", "parameters", "state", "result",
                                           "error", "mn", "created_at", "updated_at", "finished_at"],
            "properties": {"id": _UUID, "operation": {"type": "string"}, "resource_uuid": _UUID,
                           "parameters": {"type": "object"},
                           "state": {"type": "string", "enum": list(JOB_STATES)},
                           "result": {"type": "object", "nullable": True},
                           "error": {"type": "object", "nullable": True, "properties": {
                               "code": {"type": "string"}, "message": {"type": "string"}}},
                           "mn": _NULLABLE_UUID, "created_at": _TS, "updated_at": _TS,
                           "finished_at": {**_TS, "nullable": True}}},
    "JobAccepted": {"type": "object", "required": ["job"], "properties": {"job": {"$ref": "#/components/schemas/Job"}}},
    "HostList": _page_of("hosts", "Host"),
    "HostPing": {"type": "object", "required": ["uuid", "reachable", "error", "tracked_by", "seconds"],
                 "properties": {"uuid": _UUID, "reachable": {"type": "boolean"},
                                "error": {"type": "string", "nullable": True}, "tracked_by": _UUID,
                                "seconds": {"type": "number", "minimum": 0}}},
    "VmList": _page_of("vms", "Vm"),
    "JobList": _page_of("jobs", "Job"),
    "Document": {"type": "object"},
    "Ring": {"type": "object", "required": ["self", "epoch", "members", "state"],
             "properties": {"self": _NULLABLE_UUID, "epoch": _INT, "members": {"type": "array", "items": _UUID},
                            "state": {"type": "string"}}},
    "Owner": {"type": "object", "required": ["resource", "owner", "epoch"],
              "properties": {"resource": {"type": "string"}, "owner": _UUID, "epoch": _INT}},
}

_ERROR_TEXT = {400: "Bad input (the message names the field)", 401: "Missing or wrong bearer token",
               404: "No such resource", 409: "Invalid state transition or conflict", 413: "Body larger than 64 KiB",
               415: "Body is not application/json",
               422: "The Idempotency-Key was used before with a different request",
               429: "Too many requests are waiting on this MN: retry after Retry-After seconds",
               503: "The broker or database is unavailable, or this MN is suspended: retry after Retry-After seconds"}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 document of every route in ROUTES."""
    schemas = dict(COMPONENTS)
    for body in (HOST_CREATE, VM_CREATE, VM_MIGRATE, NO_FIELDS):
        schemas[body.name] = body.json_schema()
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.0.3",
        "info": {"title": "ZStack management node API", "version": "1.0.0",
                 "description": "Hosts, VMs and durable jobs. Long operations answer 202 with a job; "
                                "GET /v1/jobs/{id}?wait=<s> waits for it."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation(route: Route) -> dict[str, Any]:
    status, schema = route.success
    op: dict[str, Any] = {
        "operationId": route.operation_id, "summary": route.summary,
        "responses": {str(status): {"description": "OK" if status == 200 else "Accepted: the job",
                                    "content": {"application/json": {"schema": _ref(schema)}}}},
    }
    if status == 202:
        op["responses"]["202"]["headers"] = {
            "Location": {"schema": {"type": "string"}, "description": "/v1/jobs/{id}"},
            idempotency.REPLAYED: {"schema": {"type": "string", "enum": ["true"]},
                                   "description": "The job of an earlier request with the same Idempotency-Key"}}
    for code in route.errors:
        op["responses"][str(code)] = {"description": _ERROR_TEXT[code],
                                      "content": {"application/json": {"schema": _ref("Error")}}}
        if code in (429, 503):
            op["responses"][str(code)]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                                 "description": "Seconds to wait before retrying"}}
    params = [{"name": name, "in": "path", "required": True, "schema": _UUID} for name in route.path_params]
    params += [{"name": f.name, "in": "query", "required": False, "schema": f.json_schema()} for f in route.query]
    if route.method in ("POST", "DELETE"):
        params.append({"name": idempotency.HEADER, "in": "header", "required": False, "schema": idempotency.SCHEMA,
                       "description": "Retry with the same key and request: the first job comes back, nothing is "
                                      f"done twice (kept {idempotency.DEFAULT_RETENTION_HOURS} h by default)"})
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": route.body_required,
                             "content": {"application/json": {"schema": _ref(route.body.name)}}}
    op["security"] = [{"bearer": []}] if route.auth else []
    return op


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}
