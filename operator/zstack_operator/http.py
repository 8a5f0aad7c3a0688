"""The operator's HTTP port: /healthz (liveness), /readyz and /metrics (Prometheus), on leader and standby."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


async def start(bind: str, port: int, healthy: Callable[[], str | None]) -> web.AppRunner:
    """Serve until the returned runner is cleaned up. `healthy()` returns None, or why it is not."""

    async def healthz(_: web.Request) -> web.Response:
        problem = healthy()
        return web.Response(status=503 if problem else 200, text=(problem or "ok") + "\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, bind, port).start()
    return runner
