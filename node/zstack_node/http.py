"""The MN's one HTTP port: health, readiness, Prometheus metrics and the ring (aiohttp); HTTPS with TLS files."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from zstack_node.node import ManagementNode

NODE_KEY: web.AppKey[ManagementNode] = web.AppKey("node")


def build_app(node: ManagementNode) -> web.Application:
    """The aiohttp application: health, metrics and the ring, plus each service's routes."""
    app = web.Application(client_max_size=1024**2)
    app[NODE_KEY] = node
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", prometheus)
    app.router.add_get("/v1/cluster/ring", ring)
    app.router.add_get("/v1/cluster/owner/{resource}", owner)
    for service in node.services.values():
        service.add_routes(app)
    return app


async def healthz(_request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once connected to the broker and the DB and joined to the ring."""
    node = request.app[NODE_KEY]
    checks = node.readiness()
    return web.json_response({"ready": all(checks.values()), "checks": checks, "state": node.state},
                             status=200 if all(checks.values()) else 503)


async def prometheus(_request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest())
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def ring(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    return web.json_response({**node.ring.as_dict(node.uuid), "state": node.state})


async def owner(request: web.Request) -> web.Response:
    node = request.app[NODE_KEY]
    resource = request.match_info["resource"]
    if not node.ring.members:
        return web.json_response({"error": "the ring is empty: this MN is not serving"}, status=503)
    return web.json_response({"resource": resource, "owner": node.owner(resource), "epoch": node.ring.epoch})


async def serve(app: web.Application, bind: str, port: int, ssl_context: ssl.SSLContext | None = None
                ) -> web.AppRunner:
    """Start listening, HTTPS only when given an SSL context; the caller cleans up the returned runner."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, bind, port, ssl_context=ssl_context).start()
    return runner
