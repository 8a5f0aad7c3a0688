"""A small synchronous client of the MN REST API (standard library only).

Every failure surfaces as `RequestFailed` with a message that says what went wrong and, where it helps,
what to do next. The bearer token is sent but never appears in a message.

Each POST or DELETE that starts a job carries a fresh `Idempotency-Key`; when its answer is lost (the
connection was refused, reset or timed out, or the answer was broken) the same request is sent again with
the same key, so the MN hands back the first job instead of doing the work twice. Any request answered
503 or 429 is retried after its `Retry-After`. Retries are bounded by a `RetryPolicy`.

An https URL is always verified, certificate and hostname, against `ca_file` (the cluster's CA) or else the
system's trust store; a certificate that does not verify is never retried.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

UUID_RE = re.compile(r"^[0-9a-f]{32}$")
TERMINAL_STATES = frozenset({"Succeeded", "Failed"})
MAX_SERVER_WAIT = 60  # the API caps ?wait= at 60 s
DEFAULT_URL = "http://127.0.0.1:8080"
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
RETRY_STATUSES = frozenset({429, 503})
_LOST_TLS = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)  # the connection went, not the trust
MAX_PAGE = 1000  # the API's largest ?limit=
LISTS = ("hosts", "vms", "jobs")

Json = dict[str, Any]


class RequestFailed(Exception):
    """An API call failed. `status` is the HTTP status (None when the MN could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 field: str | None = None, transport: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.field = status, code, field
        self.transport = transport  # the answer was lost: the request may or may not have arrived
        self.retry_after = retry_after  # seconds, from a 503/429's Retry-After header

    @property
    def exit_code(self) -> int:
        """2 for a request the server refused as bad input (4xx), 1 for anything else."""
        return 2 if self.status is not None and 400 <= self.status < 500 else 1


class JobFailed(Exception):
    """A job reached the Failed state; `job` is its last document."""

    def __init__(self, job: Json) -> None:
        error = job.get("error") or {}
        code, message = error.get("code") or "failed", error.get("message") or "no error message"
        super().__init__(f"job {job.get('id')} ({job.get('operation')}) failed: {code}: {message}")
        self.job = job


class JobTimeout(Exception):
    """A job was still not terminal when the client stopped waiting; `job` is its last document."""

    def __init__(self, job: Json, waited: float) -> None:
        super().__init__(f"job {job.get('id')} ({job.get('operation')}) still {job.get('state')} after "
                         f"{waited:.0f}s; check it later with: zstack-cli jobs wait {job.get('id')}")
        self.job = job


def check_url(url: str) -> str:
    """Return `url` without a trailing slash, or raise ValueError saying what a good one looks like."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL; for example {DEFAULT_URL}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"{url!r} must be the MN's base URL without a path, for example {DEFAULT_URL}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"{url!r} has a bad port ({exc})") from None
    return url.rstrip("/")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a request is retried: at most `attempts` sends within `budget` seconds.

    A lost answer waits `first_delay`, doubling each time up to `max_delay`; a 503/429 waits its
    Retry-After (else the same backoff). No retry starts that would end its wait past the budget.
    """

    attempts: int = 5
    budget: float = 60.0
    first_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, error: RequestFailed, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 for the first retry)."""
        if error.retry_after is not None:
            return max(0.0, error.retry_after)
        return min(self.first_delay * 2 ** (retry - 1), self.max_delay)


@dataclass(frozen=True)
class Page:
    """One page of a list: its rows and the token of the next page (None on the last page)."""

    rows: list[Json]
    next_token: str | None


def new_idempotency_key() -> str:
    """A fresh random key for one POST or DELETE and all its retries."""
    return uuid.uuid4().hex


def _retry_after(value: str | None) -> float | None:
    """The seconds of a Retry-After header (an HTTP date or garbage counts as absent)."""
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _error_from_body(status: int, body: bytes, reason: str) -> RequestFailed:
    """Turn an error response into an RequestFailed, whatever shape its body has."""
    code = field = None
    message = ""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        error = doc["error"]
        if isinstance(error, dict):
            code, message, field = error.get("code"), str(error.get("message") or ""), error.get("field")
        else:
            message = str(error)
    elif body:
        message = body.decode(errors="replace").strip().splitlines()[0][:200]
    message = message or f"HTTP {status} {reason}"
    return RequestFailed(message, status=status, code=code, field=field)


def _timed_out(method: str, url: str, limit: float) -> RequestFailed:
    return RequestFailed(f"{method} {url}: no answer within {limit:g}s; is the MN overloaded? Raise --timeout "
                         "or try another MN with --url", transport=True)


def _unreachable(base: str, reason: object) -> RequestFailed:
    return RequestFailed(f"cannot reach {base}: {reason}. Is an MN running there? Set --url / ZSTACK_API_URL",
                         transport=True)


CA_ADVICE = ("the cluster's CA is in its Secret <cluster>-api-tls: kubectl get secret <cluster>-api-tls "
             "-o jsonpath='{.data.ca\\.crt}' | base64 -d > ca.crt")
_HOSTNAME_MISMATCH = (62, 64)  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH


def _untrusted(base: str, err: ssl.SSLCertVerificationError, ca_file: str | None) -> RequestFailed:
    """A certificate that did not verify: final (no retry), with what to do next."""
    reason = err.verify_message or err.reason or str(err)
    if err.verify_code in _HOSTNAME_MISMATCH:
        return RequestFailed(f"the certificate of {base} does not name its host ({reason}); use a --url with a host "
                             "name the certificate holds, or pass --tls-server-name / ZSTACK_TLS_SERVER_NAME with "
                             "one (the operator's certificates name <cluster>-api.<namespace>.svc)")
    where = (f"it does not verify against the CA in {ca_file} (--ca-file); pass the cluster's CA" if ca_file else
             "pass --ca-file / ZSTACK_CA_FILE with the cluster's CA")
    return RequestFailed(f"cannot verify the certificate of {base}: {reason}; {where} ({CA_ADVICE})")


def _tls_failed(base: str, err: ssl.SSLError) -> RequestFailed:
    """A TLS handshake that failed for another reason (no retry): most often plain HTTP on the port."""
    return RequestFailed(f"TLS with {base} failed: {err.reason or err}; does the MN serve HTTPS there? (an MN "
                         "without --tls-cert-file serves http://)")


def sends_token_in_clear(url: str) -> bool:
    """Whether a token sent to `url` crosses a network unencrypted: plain http to a host other than loopback."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http":
        return False
    host = (parts.hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """The API never redirects; following one would send the bearer token to wherever it points."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001, ANN201 - urllib's signature
        return None  # urllib then raises HTTPError with the 3xx status


class _ServerNameContext(ssl.SSLContext):
    """Checks the certificate against `server_name` instead of the URL's host (kubectl's --tls-server-name):
    an MN reached by pod IP or through a tunnel still proves it is the Service its certificate names."""

    server_name: str | None = None

    def wrap_socket(self, sock, *args, server_hostname=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        return super().wrap_socket(sock, *args, server_hostname=self.server_name or server_hostname, **kwargs)


def make_opener(ca_file: str | None = None, server_name: str | None = None) -> urllib.request.OpenerDirector:
    """An opener that refuses redirects and verifies https (certificate and hostname, or `server_name`) against
    `ca_file`, else the system's trust store. Raises ValueError when `ca_file` cannot be read as a PEM CA
    bundle."""
    context = _ServerNameContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificates and host names
    context.server_name = server_name
    try:
        if ca_file:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs()
    except (OSError, ssl.SSLError) as exc:  # SSLError: no certificate in the file
        raise ValueError(f"cannot load a CA bundle from {ca_file}: {getattr(exc, 'strerror', None) or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return urllib.request.build_opener(_RefuseRedirects, urllib.request.HTTPSHandler(context=context))


class ApiClient:
    """Calls one MN's API. `timeout` bounds each HTTP request (a long poll adds its wait to it).

    `retry` bounds the retries of a request; `on_retry` is told (in a sentence) about each one. An https
    URL is verified against `ca_file` (a PEM CA bundle), else the system's trust store, and its certificate
    must name `server_name` if given, else the URL's host.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 30.0,
                 retry: RetryPolicy | None = None, on_retry: Callable[[str], None] | None = None,
                 ca_file: str | None = None, server_name: str | None = None) -> None:
        self.url = check_url(url)
        self.ca_file = ca_file
        self._opener = make_opener(ca_file, server_name)  # ValueError on a bad CA bundle
        self._token = token
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.sleep: Callable[[float], None] = time.sleep

    def __repr__(self) -> str:  # never show the token
        return f"ApiClient({self.url!r}, token={'set' if self._token else 'unset'})"

    # -- transport ---------------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None,
                query: Mapping[str, Any] | None = None, timeout: float | None = None,
                idempotency_key: str | None = None) -> Json:
        """Send a request, retrying as the RetryPolicy allows; return the decoded JSON document of a 2xx
        answer or raise RequestFailed.

        503 and 429 answers are retried after their Retry-After. A lost answer is retried only with an
        `idempotency_key` (the MN then answers a repeat with the first job), never a 4xx other than 429.
        """
        start = time.monotonic()
        attempt = 1
        while True:
            try:
                doc, headers = self._send(method, path, body, query, timeout, idempotency_key)
            except RequestFailed as err:
                delay = self._retry_delay(err, attempt, start, idempotency_key is not None)
                if delay is None:
                    raise
                self._tell(f"{method} {path}: {err}; retrying in {delay:.1f}s (attempt {attempt + 1} of "
                           f"{self.retry.attempts})")
                self.sleep(delay)
                attempt += 1
                continue
            if attempt > 1 and headers.get(REPLAYED_HEADER) == "true":
                self._tell(f"{method} {path}: the MN had accepted an earlier attempt; that job is the answer "
                           f"({REPLAYED_HEADER})")
            return doc

    def _retry_delay(self, err: RequestFailed, attempt: int, start: float, keyed: bool) -> float | None:
        """Seconds to wait before sending again, or None when `err` is final."""
        if not (err.status in RETRY_STATUSES or (err.transport and keyed)) or attempt >= self.retry.attempts:
            return None
        delay = self.retry.delay(err, attempt)
        return None if time.monotonic() - start + delay > self.retry.budget else delay

    def _tell(self, message: str) -> None:
        if self.on_retry is not None:
            self.on_retry(message)

    def _send(self, method: str, path: str, body: Mapping[str, Any] | None, query: Mapping[str, Any] | None,
              timeout: float | None, idempotency_key: str | None) -> tuple[Json, Mapping[str, str]]:
        """Send one request; return the JSON document and the headers of a 2xx answer."""
        query = {k: v for k, v in (query or {}).items() if v is not None}
        url = self.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        limit = self.timeout if timeout is None else timeout
        try:
            with self._opener.open(req, timeout=limit) as response:
                raw, answer_headers = response.read(), response.headers
        except urllib.error.HTTPError as err:
            raise self._http_error(method, url, err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise _timed_out(method, url, limit) from None
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                raise _untrusted(self.url, err.reason, self.ca_file) from None
            if isinstance(err.reason, ssl.SSLError) and not isinstance(err.reason, _LOST_TLS):
                raise _tls_failed(self.url, err.reason) from None
            raise _unreachable(self.url, err.reason) from None
        except TimeoutError:
            raise _timed_out(method, url, limit) from None
        except OSError as err:  # includes a connection reset or closed mid-answer
            raise _unreachable(self.url, err or type(err).__name__) from None
        except http.client.HTTPException as err:
            raise RequestFailed(f"{method} {url}: broken HTTP answer ({type(err).__name__}); is {self.url} a ZStack "
                                "MN?", transport=True) from None
        return self._decode(method, url, raw), answer_headers

    def _http_error(self, method: str, url: str, err: urllib.error.HTTPError) -> RequestFailed:
        """The RequestFailed of a non-2xx answer."""
        if 300 <= err.code < 400:
            location = err.headers.get("Location")
            return RequestFailed(f"{method} {url}: answered a redirect ({err.code}) to {location}; an MN never "
                                 "redirects, so the token was not sent on. Check --url / ZSTACK_API_URL",
                                 status=err.code)
        try:
            body = err.read()
        except (OSError, http.client.HTTPException):
            body = b""
        error = self._explain(_error_from_body(err.code, body, err.reason))
        error.retry_after = _retry_after(err.headers.get("Retry-After"))
        return error

    def _decode(self, method: str, url: str, raw: bytes) -> Json:
        """The JSON object of a 2xx answer ({} for an empty one)."""
        if not raw:
            return {}
        try:
            doc = json.loads(raw)
        except ValueError:
            raise RequestFailed(f"{method} {url}: the answer is not JSON; is {self.url} a ZStack MN?",
                                transport=True) from None
        if not isinstance(doc, dict):
            raise RequestFailed(f"{method} {url}: expected a JSON object, got {type(doc).__name__}")
        return doc

    def _explain(self, error: RequestFailed) -> RequestFailed:
        """Add the next step to errors whose fix is on the client's side."""
        if error.status == 401 and error.code == "no_token_configured":
            return RequestFailed(f"unauthorized: {error}", status=401, code=error.code, field=error.field)
        if error.status == 401:
            hint = ("pass --token / ZSTACK_API_TOKEN with the MN's api token" if not self._token
                    else "the token was refused; check --token / ZSTACK_API_TOKEN against the MN's --api-token")
            return RequestFailed(f"unauthorized: {error} ({hint})", status=401, code=error.code, field=error.field)
        return error

    def get(self, path: str, **query: Any) -> Json:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Mapping[str, Any] | None = None) -> Json:
        """POST with a fresh Idempotency-Key (kept for its retries)."""
        return self.request("POST", path, body=body if body is not None else {},
                            idempotency_key=new_idempotency_key())

    def delete(self, path: str) -> Json:
        """DELETE with a fresh Idempotency-Key (kept for its retries)."""
        return self.request("DELETE", path, idempotency_key=new_idempotency_key())

    # -- lists, a page at a time -------------------------------------------------------------------------

    def list_page(self, kind: str, limit: int | None = None, token: str | None = None, **filters: Any) -> Page:
        """One page of /v1/<kind> (hosts, vms or jobs); `token` is the previous page's `next_token`."""
        if kind not in LISTS:
            raise ValueError(f"unknown list {kind!r}")
        doc = self.get(f"/v1/{kind}", limit=limit, **filters, **({"continue": token} if token else {}))
        rows = doc.get(kind)
        if not isinstance(rows, list):
            raise RequestFailed(f"GET /v1/{kind}: the answer has no {kind!r} list; is {self.url} a ZStack MN?")
        next_token = doc.get("continue")
        return Page(rows, next_token if isinstance(next_token, str) and next_token else None)

    def iter_pages(self, kind: str, limit: int | None = None, **filters: Any) -> Iterator[Page]:
        """Every page of a list in turn, following `continue` with the same filters."""
        token: str | None = None
        while True:
            page = self.list_page(kind, limit, token, **filters)
            yield page
            if page.next_token is None:
                return
            if page.next_token == token or not page.rows:
                raise RequestFailed(f"GET /v1/{kind}: the MN sent a page that does not move on; stopped walking")
            token = page.next_token

    def list_all(self, kind: str, limit: int | None = None, on_page: Callable[[int], None] | None = None,
                 **filters: Any) -> list[Json]:
        """Every row of a list; `on_page` is called with the number of rows fetched so far after each page."""
        rows: list[Json] = []
        for page in self.iter_pages(kind, limit, **filters):
            rows += page.rows
            if on_page is not None:
                on_page(len(rows))
        return rows

    # -- hosts -------------------------------------------------------------------------------------------

    def list_hosts(self, limit: int | None = None) -> list[Json]:
        """The first page of hosts (see list_all for every one)."""
        return self.list_page("hosts", limit).rows

    def get_host(self, uuid: str) -> Json:
        return self.get(f"/v1/hosts/{uuid}")

    def add_host(self, name: str, cpu: int, memory: int, uuid: str | None = None) -> Json:
        body: Json = {"name": name, "cpu": cpu, "memory": memory}
        if uuid:
            body["uuid"] = uuid
        return self.post("/v1/hosts", body)["job"]

    def delete_host(self, uuid: str) -> Json:
        return self.delete(f"/v1/hosts/{uuid}")["job"]

    def reconnect_host(self, uuid: str) -> Json:
        return self.post(f"/v1/hosts/{uuid}/actions/reconnect")["job"]

    def ping_host(self, uuid: str) -> Json:
        """Ping a host now through the MN that tracks it: {uuid, reachable, error, tracked_by, seconds}.

        A ping is a read, so it carries no Idempotency-Key and a lost answer is not retried."""
        return self.request("POST", f"/v1/hosts/{uuid}/actions/ping", body={})

    # -- VMs ---------------------------------------------------------------------------------------------

    def list_vms(self, state: str | None = None, host_uuid: str | None = None, limit: int | None = None
                 ) -> list[Json]:
        """The first page of VMs (see list_all for every one)."""
        return self.list_page("vms", limit, state=state, host_uuid=host_uuid).rows

    def get_vm(self, uuid: str) -> Json:
        return self.get(f"/v1/vms/{uuid}")

    def create_vm(self, name: str, cpu: int, memory: int, uuid: str | None = None,
                  host_uuid: str | None = None) -> Json:
        body: Json = {"name": name, "cpu": cpu, "memory": memory}
        if uuid:
            body["uuid"] = uuid
        if host_uuid:
            body["host_uuid"] = host_uuid
        return self.post("/v1/vms", body)["job"]

    def vm_action(self, uuid: str, action: str, body: Mapping[str, Any] | None = None) -> Json:
        return self.post(f"/v1/vms/{uuid}/actions/{action}", body)["job"]

    # -- jobs --------------------------------------------------------------------------------------------

    def get_job(self, job_id: str, wait: float | None = None) -> Json:
        if wait is None:
            return self.get(f"/v1/jobs/{job_id}")
        wait = max(0, min(int(wait), MAX_SERVER_WAIT))
        return self.request("GET", f"/v1/jobs/{job_id}", query={"wait": wait}, timeout=self.timeout + wait)

    def list_jobs(self, resource_uuid: str | None = None, state: str | None = None,
                  limit: int | None = None) -> list[Json]:
        """The first page of jobs, newest first (see list_all for every one)."""
        return self.list_page("jobs", limit, resource_uuid=resource_uuid, state=state).rows

    def wait_job(self, job: Json | str, timeout: float = 600.0, poll: float = 1.0,
                 on_progress: Callable[[Json, float], None] | None = None, outage_grace: float = 30.0) -> Json:
        """Long-poll until the job is terminal. Raise JobFailed / JobTimeout; return the Succeeded job.

        `poll` is the server-side wait per request (whole seconds, at least 1); `on_progress` is called
        after each answer with the job and the seconds waited so far. The job is durable, so an MN that
        cannot be reached or answers 5xx (it died, or a Service in front moves us to another one) is
        retried for up to `outage_grace` seconds in a row before the error is raised.
        """
        doc = job if isinstance(job, dict) else self.get_job(job)
        start = time.monotonic()
        step = max(1, int(poll))
        outage_since: float | None = None
        while True:
            elapsed = time.monotonic() - start
            if on_progress is not None:
                on_progress(doc, elapsed)
            if doc.get("state") in TERMINAL_STATES:
                break
            left = timeout - elapsed
            if left <= 0:
                raise JobTimeout(doc, elapsed)
            try:
                doc = self.get_job(doc["id"], wait=max(1, min(step, int(left + 0.999))))
                outage_since = None
            except RequestFailed as err:
                if err.status is not None and err.status < 500:
                    raise
                now = time.monotonic()
                outage_since = outage_since or now
                if now - outage_since >= outage_grace:
                    raise
                time.sleep(min(1.0, max(0.0, left)))
        if doc["state"] == "Failed":
            raise JobFailed(doc)
        return doc

    # -- ring --------------------------------------------------------------------------------------------

    def ring(self) -> Json:
        return self.get("/v1/cluster/ring")

    def owner(self, uuid: str) -> Json:
        return self.get(f"/v1/cluster/owner/{uuid}")
