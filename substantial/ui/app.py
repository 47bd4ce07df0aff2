"""The web UI's server: static files and a JSON API over the Backend contract.

Security, in order of the checks each request meets:

* the ``Host`` header must name the address the server is bound to (or
  ``localhost`` for a loopback bind), so a page on another site cannot reach
  the API through a DNS name rebound to 127.0.0.1;
* with a token, every request must carry it (``Authorization: Bearer``, or the
  cookie set by opening the page once with ``?token=``); binding to anything
  but a loopback address requires a token;
* actions (send an event, cancel, resume) exist only with ``allow_actions``, must be
  ``POST`` with a JSON body (which a cross-site form cannot send without a
  preflight we never answer) and, when the browser sends an ``Origin``, one
  equal to the page's own;
* every response forbids inline scripts (Content-Security-Policy), and the
  page renders everything from the log as text, never as HTML.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from substantial._holders import held_runs, holders_json
from substantial.backends import from_url, redact_url
from substantial.backends.base import Backend
from substantial.conductor import Conductor
from substantial.errors import InvalidArgument, RunNotFound, SubstantialError
from substantial.search import RunQuery, find_runs, parse_cursor, parse_time, run_json
from substantial.timeline import load

__all__ = ["UIConfig", "create_app", "serve"]

COOKIE = "substantial_ui_token"
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "index.html": "text/html; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class UIConfig:
    """How the UI is served: which store, where, and what it may do."""

    backend_url: str
    host: str = "127.0.0.1"
    port: int = 8765
    allow_actions: bool = False
    token: str | None = None

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and not self.token:
            raise InvalidArgument(
                f"--host {self.host} would expose the store beyond this machine: "
                "pass --token with a secret, or bind to 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 8:
            raise InvalidArgument("--token must be at least 8 characters long")


def is_loopback(host: str) -> bool:
    """Tell whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _json(data: Any, status: int = 200) -> Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS, default=str)
    return Response(body, status, media_type="application/json")


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


class _Guard:
    """Host check, token check and security headers, around the whole app."""

    def __init__(self, app: ASGIApp, config: UIConfig) -> None:
        self.app = app
        self.config = config
        names = {config.host.strip("[]").lower()}
        if is_loopback(config.host):
            names |= {"localhost", "127.0.0.1", "::1"}
        self.hosts = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if name.strip("[]").lower() not in self.hosts:
            await _error(400, f"unexpected Host header {host!r}")(scope, receive, send)
            return
        if self.config.token is not None and not self._authorized(scope, headers):
            await _error(401, "this UI needs its token: open it with ?token=...")(
                scope, receive, send
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] += [
                    (b"content-security-policy", _CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _authorized(self, scope: Scope, headers: dict[str, str]) -> bool:
        token = self.config.token or ""
        offered: list[str] = []
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            offered.append(auth[7:].strip())
        for part in headers.get("cookie", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE:
                offered.append(value)
        if scope["path"] == "/":
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            offered += query.get("token", [])
        return any(hmac.compare_digest(o.encode(), token.encode()) for o in offered)


def _query(request: Request) -> RunQuery:
    q = request.query_params
    now = time.time()
    where = q.get("where") or None
    try:
        expr = orjson.loads(where) if where else None
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"where must be JSON: {exc}") from exc
    sort = q.get("sort") or "created"
    return RunQuery(
        status=q.get("status") or None,
        workflow=q.get("workflow") or None,
        parent=q.get("parent") or None,
        since=parse_time(q["since"], now=now, what="since") if q.get("since") else None,
        until=parse_time(q["until"], now=now, what="until") if q.get("until") else None,
        text=q.get("id") or None,
        queue=q.get("queue") or None,
        where=expr,
        sort=sort,
        descending=(sort in ("created", "updated")) != (q.get("reverse") == "1"),
        limit=min(int(q.get("limit") or 50), 500),
        offset=int(q.get("offset") or 0) if not q.get("before") else 0,
        before=parse_cursor(q["before"], "before=") if q.get("before") else None,
    )


def create_app(config: UIConfig) -> ASGIApp:
    """Build the ASGI app for ``config``: the page, its files, and the JSON API."""
    state: dict[str, Backend] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state["backend"] = from_url(config.backend_url)
        try:
            yield
        finally:
            await state["backend"].close()

    async def page(request: Request) -> Response:
        if config.token is not None and "token" in request.query_params:
            # Keep the token out of the address bar and history: a cookie carries it from now on.
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, config.token, httponly=True, samesite="strict", path="/")
            return response
        return _static_file("index.html")

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return _error(404, "no such file")
        return _static_file(name)

    async def api_config(request: Request) -> Response:
        # The URL as given (secrets masked): what the person typed, not a resolved path.
        return _json({"actions": config.allow_actions, "backend": redact_url(config.backend_url)})

    async def api_runs(request: Request) -> Response:
        try:
            query = _query(request)
        except (SubstantialError, ValueError) as exc:
            return _error(400, str(exc))
        try:
            page = await find_runs(state["backend"], query)
        except InvalidArgument as exc:  # e.g. no such queue
            return _error(400, str(exc))
        except SubstantialError as exc:
            return _error(503, str(exc))
        newest = query.sort == "created" and query.descending
        return _json(
            {
                "runs": [run_json(info) for info in page.runs],
                "total": page.total,
                "scanned": page.scanned,
                "truncated": page.truncated,
                "offset": query.offset,
                "limit": query.limit,
                # Newest first, the next page starts after this run without reading the ones
                # before it (an offset would read them all again).
                "next_before": (
                    [page.runs[-1].created_at, page.runs[-1].run_id]
                    if newest and len(page.runs) == query.limit
                    else None
                ),
                "now": time.time(),
            }
        )

    async def api_workers(request: Request) -> Response:
        now = time.time()
        try:
            views, stale = await held_runs(state["backend"], now)
        except SubstantialError as exc:
            return _error(503, str(exc))
        return _json({**holders_json(views, stale), "now": now})

    async def api_run(request: Request) -> Response:
        try:
            tl = await load(state["backend"], request.path_params["run_id"])
        except RunNotFound as exc:
            return _error(404, str(exc))
        except SubstantialError as exc:
            return _error(503, str(exc))
        return _json(tl.to_json())

    async def api_action(request: Request) -> Response:
        if not config.allow_actions:
            return _error(403, "actions are off: start the UI with --allow-actions")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "send a JSON body (Content-Type: application/json)")
        origin = request.headers.get("origin")
        if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
            return _error(403, f"cross-origin request from {origin!r} refused")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            return _error(400, f"the body must be JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        conductor = Conductor(state["backend"])
        action = request.path_params["action"]
        try:
            run = conductor.get(request.path_params["run_id"])
            if action == "cancel":
                await run.cancel()
                return _json({"ok": True})
            if action == "resume":
                # No workflow code here to check the log against: the resume is not replayed
                # first, as `runs resume` without --check.
                await conductor.resume(run.run_id, timeout=body.get("timeout"))
                return _json({"ok": True})
            if action != "events":
                return _error(404, "unknown action: use events, cancel or resume")
            name = body.get("name")
            if not isinstance(name, str) or not name:
                return _error(400, "an event needs a non-empty string 'name'")
            event_id = await run.send(name, body.get("value"), event_id=body.get("event_id"))
        except RunNotFound as exc:
            return _error(404, str(exc))
        except SubstantialError as exc:
            return _error(400, str(exc))
        return _json({"ok": True, "event_id": event_id})

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", static),
            Route("/api/config", api_config),
            Route("/api/runs", api_runs),
            Route("/api/workers", api_workers),
            Route("/api/runs/{run_id}", api_run),
            Route("/api/runs/{run_id}/{action}", api_action, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    return _Guard(app, config)


def _static_file(name: str) -> Response:
    data = resources.files("substantial.ui").joinpath("static", name).read_bytes()
    return Response(data, media_type=_STATIC[name])


def serve(config: UIConfig, *, ready: Any = None) -> None:
    """Serve the UI until interrupted (blocking); print where it listens."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            log_level="warning",
            lifespan="on",
        )
    )
    if ready is not None:
        ready(server)
    server.run()


def describe(config: UIConfig) -> str:
    """Return the address people open, with the token when one is needed."""
    host = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{host}:{config.port}/"
    suffix = f"?token={config.token}" if config.token else ""
    mode = "actions allowed" if config.allow_actions else "read-only"
    return f"{url}{suffix}  ({mode}, store {redact_url(config.backend_url)})"
