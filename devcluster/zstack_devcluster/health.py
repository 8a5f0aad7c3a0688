"""Health probes for the components, using only the standard library (fast to import)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

from zstack_devcluster.pki import Pki


def _get(url: str, context: ssl.SSLContext | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``; returns (status, body), with status 0 when the server cannot be reached."""
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, ValueError):
        return 0, b""


def admin_context(pki: Pki) -> ssl.SSLContext:
    """TLS context that trusts the devcluster CA and presents the admin client certificate."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
    ctx.load_cert_chain(str(pki.client_crt("admin")), str(pki.client_key("admin")))
    return ctx


def etcd_healthy(port: int) -> bool:
    status, body = _get(f"http://127.0.0.1:{port}/health")
    if status != 200:
        return False
    try:
        return json.loads(body).get("health") == "true"
    except ValueError:
        return False


def https_ok(port: int, path: str, ctx: ssl.SSLContext) -> bool:
    """True when ``https://127.0.0.1:<port><path>`` answers 200 ``ok``."""
    status, body = _get(f"https://127.0.0.1:{port}{path}", ctx)
    return status == 200 and body.strip() == b"ok"


def node_ready(port: int, node: str, ctx: ssl.SSLContext) -> bool:
    """True when Node ``node`` exists and its Ready condition is True."""
    status, body = _get(f"https://127.0.0.1:{port}/api/v1/nodes/{node}", ctx)
    if status != 200:
        return False
    conditions = json.loads(body).get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def default_service_account(port: int, ctx: ssl.SSLContext) -> bool:
    """True once the ServiceAccount controller has made `default/default`.

    Until then the API server rejects pods in `default`, so `up` waits for it.
    """
    status, _ = _get(f"https://127.0.0.1:{port}/api/v1/namespaces/default/serviceaccounts/default", ctx)
    return status == 200
