"""The Starlette app, its routes and the same-origin rule; serve() runs it under uvicorn."""
from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

from ..errors import UserError
from .jobs import BadRequest, Limits
from .service import VideoServer
from .spool import CLIP_NAME

WEB = Path(__file__).parents[1] / "web"
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORT = {"http": "80", "ws": "80", "https": "443", "wss": "443"}


def _host_port(netloc: str, scheme: str) -> tuple[str, str]:
    """(host, port) of a Host header or an origin's netloc, lower case, with the scheme's default port filled in."""
    netloc = netloc.strip().lower()
    host, _, port = netloc.rpartition(":") if not netloc.endswith("]") and ":" in netloc else (netloc, "", "")
    return host.strip("[]"), port or _DEFAULT_PORT.get(scheme, "")


def cross_origin(scope, allowed_hosts: frozenset[str] | None = None) -> str | None:
    """Why this HTTP request or WebSocket handshake is refused, or None to serve it.

    - Host not in allowed_hosts (when set: a loopback-bound server) -> refused (DNS rebinding).
    - Origin present: it must be the page's own origin, the scheme and Host the request was sent to
      (ws/wss count as http/https) -> else refused. Browsers send Origin on every WebSocket handshake and every
      cross-origin or non-GET fetch, so a page elsewhere cannot pass.
    - No Origin: a non-browser client (curl, scripts, the tests), served; except an unsafe method whose
      Sec-Fetch-Site is same-site or cross-site (a browser that withheld Origin still says where it came from).
    """
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    host = headers.get("host", "")
    if allowed_hosts is not None and _host_port(host, scheme)[0] not in allowed_hosts:
        return f"host {host!r} is not served here"
    origin = headers.get("origin")
    if origin is None:
        unsafe = scope["type"] == "http" and scope.get("method", "GET") not in ("GET", "HEAD", "OPTIONS")
        if unsafe and headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused"
        return None
    parts = urlsplit(origin)
    if origin == "null" or parts.scheme not in ("http", "https") or not host:
        return "cross-origin request refused"
    if parts.scheme != scheme or _host_port(parts.netloc, parts.scheme) != _host_port(host, scheme):
        return f"cross-origin request refused: origin {origin} is not this page's"
    return None


class SameOrigin:
    """ASGI middleware: HTTP requests and WebSocket handshakes that cross_origin() refuses get 403 (a WebSocket is
    refused before it is accepted, with an HTTP 403 where the server supports denial responses)."""

    def __init__(self, app, allowed_hosts=None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            reason = cross_origin(scope, self.allowed_hosts() if callable(self.allowed_hosts) else self.allowed_hosts)
            if reason is not None:
                from starlette.responses import JSONResponse

                response = JSONResponse({"error": reason}, status_code=403)
                if scope["type"] == "http":
                    await response(scope, receive, send)
                elif "websocket.http.response" in scope.get("extensions", {}):
                    from starlette.websockets import WebSocket

                    await WebSocket(scope, receive, send).send_denial_response(response)
                else:  # closing before the accept: the server answers the handshake with 403
                    await send({"type": "websocket.close", "code": 1008})
                return
        await self.app(scope, receive, send)


def create_app(server: VideoServer):
    from starlette.applications import Starlette
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocketDisconnect

    async def page(request):
        return FileResponse(WEB / "index.html", media_type="text/html")

    async def info(request):
        return JSONResponse(server.info())

    async def create(request):
        limit = server.limits.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
            return JSONResponse({"error": f"the request body is {declared} bytes; the server takes at most {limit}"},
                                status_code=413)
        raw = b""
        async for piece in request.stream():  # no Content-Length (chunked): read only up to the limit
            raw += piece
            if len(raw) > limit:
                return JSONResponse({"error": f"the request body is over {limit} bytes"}, status_code=413)
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"error": "the request body is not JSON"}, status_code=400)
        try:
            job, notes = await server.create_job(body)
        except BadRequest as error:
            status = 429 if "queue is full" in str(error) else 400
            return JSONResponse({"error": str(error)}, status_code=status)
        return JSONResponse({"id": job.id, "warnings": notes}, status_code=201)

    async def save(request):
        try:
            name = await server.on_device(server.save, request.path_params["job"])
        except KeyError:
            return JSONResponse({"error": "no such video (finished videos are kept for a while only)"},
                                status_code=404)
        except (BadRequest, UserError) as error:
            return JSONResponse({"error": str(error)}, status_code=409)
        return JSONResponse({"name": name, "url": f"/clips/{name}"}, status_code=201)

    async def clip(request):
        name = request.path_params["name"]
        path = server.clips_dir / name
        if not CLIP_NAME.match(name) or not path.is_file():
            return JSONResponse({"error": "no such clip"}, status_code=404)
        return FileResponse(path, media_type="video/mp4", filename=name)

    async def stream(ws):
        await ws.accept()
        job = server.unclaimed.pop(ws.path_params["job"], None)
        if job is None:
            await ws.send_json({"type": "error", "message": "no such job (create it with POST /api/jobs; "
                                                            "unclaimed jobs expire)", "fatal": True})
            await ws.close(code=4404)
            return
        await server.run(ws, job)
        try:
            await ws.close()
        except (RuntimeError, OSError, WebSocketDisconnect):
            pass  # the client went first (uvicorn raises ClientDisconnected, an OSError, on a closed socket)

    routes = [Route("/", page), Route("/api/info", info), Route("/api/jobs", create, methods=["POST"]),
              Route("/api/jobs/{job}/save", save, methods=["POST"]), Route("/clips/{name}", clip),
              WebSocketRoute("/api/jobs/{job}/stream", stream)]
    from starlette.middleware import Middleware

    return Starlette(routes=routes,
                     middleware=[Middleware(SameOrigin, allowed_hosts=lambda: server.allowed_hosts)])


def serve(generator, host: str, port: int, clips_dir: str, limits: Limits | None = None) -> None:
    run_app(VideoServer(generator, clips_dir, limits), host, port)


def run_app(server: VideoServer, host: str, port: int) -> None:
    """The app of this server (one process, or a cluster's ingress) under uvicorn, loopback Host names only when
    bound to loopback."""
    try:
        import uvicorn
    except ImportError:
        raise UserError("the server needs uvicorn and starlette: pip install 'nasa-video[serve]'") from None
    import ipaddress

    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:  # only the names of this machine: a rebinding DNS name for 127.0.0.1 is refused
        server.allowed_hosts = LOOPBACK_HOSTS
    app = create_app(server)
    uvicorn.run(app, host=host, port=port, log_level="info", ws="websockets-sansio")
