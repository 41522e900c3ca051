"""stream-serve's own page (GET /, static files shipped as package data) and the live stream
statistics it shows (GET /v1/stream-stats, server-sent events from engine.monitor).

The page is public (it holds no data); its calls go to /v1/*, which --api-key protects like
every other endpoint (the page asks for the key). Events of /v1/stream-stats (README, "Live
stream statistics"):
  event: model   once: the units in pass order with their bytes, budget, state letters, disk
                 ceiling
  event: frame   at most every `interval` seconds while passes run, every `idle` seconds when
                 none do: each unit's state letter, recent rates, tier counters, totals
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
import logging
import math
from typing import Any

from aiohttp import web

from stream_run.server.errors import APIError, bad

log = logging.getLogger(__name__)

STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css",
                ".png": "image/png", ".svg": "image/svg+xml"}
INTERVAL_RANGE_S = (0.05, 10.0)
IDLE_RANGE_S = (0.2, 60.0)


def _static_files() -> dict[str, bytes]:
    """The page's files by name (read once; a few KB)."""
    root = importlib.resources.files("stream_run.server") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir()
            if f.is_file() and any(f.name.endswith(s) for s in STATIC_TYPES)}


def add_routes(app: web.Application, state_key: web.AppKey[Any]) -> None:
    files = _static_files()

    def respond(name: str) -> web.Response:
        body = files.get(name)
        if body is None:
            raise APIError(404, f"no file /static/{name}", code="not_found")
        ctype = next(t for s, t in STATIC_TYPES.items() if name.endswith(s))
        return web.Response(body=body, content_type=ctype, charset="utf-8"
                            if ctype.startswith("text") else None,
                            headers={"Cache-Control": "no-cache"})

    async def index(request: web.Request) -> web.Response:
        return respond("index.html")

    async def static(request: web.Request) -> web.Response:
        return respond(request.match_info["name"])

    async def stream_stats(request: web.Request) -> web.StreamResponse:
        return await _stream_stats(request, request.app[state_key])

    async def end_streams(app: web.Application) -> None:
        # stats streams never end on their own: end them cleanly, before the shutdown
        # timeout would cancel them
        engine = app[state_key].engine
        if engine is not None:
            engine.monitor.end_watches()

    app.on_shutdown.append(end_streams)
    app.router.add_get("/", index)
    app.router.add_get("/static/{name}", static)
    app.router.add_get("/v1/stream-stats", stream_stats)


def _seconds(request: web.Request, name: str, default: float, lo_hi: tuple[float, float]
             ) -> float:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise bad(f"{name} must be a number of seconds, got {raw!r}", name) from None
    lo, hi = lo_hi
    if not lo <= value <= hi:  # also refuses nan
        raise bad(f"{name} must be in {lo:g}..{hi:g} seconds, got {raw}", name)
    return value


def sse_event(name: str, obj: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(obj, allow_nan=False)}\n\n".encode()


async def _stream_stats(request: web.Request, state: Any) -> web.StreamResponse:
    interval = _seconds(request, "interval", 0.1, INTERVAL_RANGE_S)
    idle = _seconds(request, "idle", 1.0, IDLE_RANGE_S)
    engine = state.ready_engine()
    config = state.config
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    info = {"model": config.model_name, "disk_ceiling_bytes_per_s": config.disk_ceiling_bytes_per_s,
            "interval_s": interval, "idle_s": idle, **engine.monitor.model_info()}
    timeout = config.stall_limit_s
    try:
        async with engine.monitor.watch(interval, idle) as frames:
            async with asyncio.timeout(timeout):
                await resp.write(sse_event("model", info))
            async for frame in frames:
                # frames are dropped, not queued, while this client is slow: the engine
                # never waits for it; one that takes nothing for stall_timeout_s is dropped
                async with asyncio.timeout(timeout):
                    await resp.write(sse_event("frame", json_safe(frame)))
            async with asyncio.timeout(timeout):  # the server shuts down
                await resp.write_eof()
    except (ConnectionResetError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
    return resp


def json_safe(obj: Any) -> Any:
    """JSON has no inf or nan: an unlimited budget is null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    return obj
