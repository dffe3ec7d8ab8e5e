"""The HTTP API (FastAPI), served by the daemon: ingestion, administration, WeChat's callback.

Routers live beside this module, one per concern; `create_app` assembles them. Every route takes
its dependencies from `app.state` (set here), so tests can serve the same app on loopback.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.app.lifecycle import Lifecycle, LifecycleError
from scheduler.settings import Scope as TokenScope
from scheduler.settings import Settings
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

API_VERSION = "v1"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the API token's name, recorded with everything it changes."""

    name: str
    scopes: frozenset[str]


class ApiError(Exception):
    """A request the API refuses, with a status and a reason a developer can act on."""

    def __init__(self, status: int, code: str, message: str, **details: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


# A refused lifecycle action's code, as an HTTP status (anything else is a conflict: 409).
LIFECYCLE_STATUS = {"unknown_plan": 404, "unknown_enrollment": 404, "reason_required": 422}


def refused(error: LifecycleError) -> ApiError:
    return ApiError(LIFECYCLE_STATUS.get(error.code, 409), error.code, error.message)


def lifecycle_of(request: Request) -> Lifecycle:
    """The daemon's lifecycle (its clock and NOTIFY), or one on the app's store when the API
    runs on its own."""
    found = getattr(request.app.state, "lifecycle", None)
    return found if found is not None else Lifecycle(request.app.state.store)


def error_body(code: str, message: str, **details: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **details}}


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # details such as `problems`, `index`
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorDetail


# Every route documents the one shape of its refusals (FastAPI's own 422 shape is not ours),
# as JSON even on the routes that answer plain text (the callback).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {
        "model": ErrorOut,
        "description": "Refused: `error.code` says why, `message` how",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    }
}


class ErrorResponse(JSONResponse):
    """A refusal's JSON. Its field names and messages may echo the input (a map's keys, an id),
    so what UTF-8 cannot encode (a lone surrogate) is written as a JSON escape, not a 500."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.encode("utf-8", "backslashreplace")


bearer = HTTPBearer(auto_error=False)


def require(scope: TokenScope | None) -> Callable[..., Awaitable[Caller]]:
    """A dependency: the caller must present a token (Bearer) that carries `scope` (or any
    valid token when `scope` is None)."""

    async def check(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        return authenticate(request, credentials, None if scope is None else {scope})

    return check


def authenticate(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None,
    scopes: set[str] | None,
) -> Caller:
    """The caller, who must present a valid token carrying one of `scopes` (any: None)."""
    settings: Settings = request.app.state.settings
    caller = _identify(settings, credentials.credentials if credentials else None)
    if caller is None:
        raise ApiError(
            401, "unauthenticated", "send a valid API token: Authorization: Bearer <token>"
        )
    if scopes is not None and not scopes & caller.scopes:
        wanted = " or ".join(repr(s) for s in sorted(scopes))
        raise ApiError(403, "forbidden", f"token {caller.name!r} lacks the {wanted} scope")
    return caller


def _identify(settings: Settings, presented: str | None) -> Caller | None:
    if not presented:
        return None
    found = None
    # Compare against every token, in constant time each, so timing tells nothing.
    for name, token in settings.api_tokens.items():
        if hmac.compare_digest(token.token.get_secret_value().encode(), presented.encode()):
            found = Caller(name, frozenset(token.scopes))
    return found


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = ErrorResponse(
            error_body("body_too_large", f"request bodies are limited to {self.limit} bytes"),
            status_code=413,
        )
        await response({"type": "http"}, _no_receive, send)


class _TooLarge(Exception):
    pass


async def _no_receive() -> Message:  # pragma: no cover - a refusal reads nothing
    return {"type": "http.disconnect"}


def create_app(settings: Settings, store: Store, **state: Any) -> FastAPI:
    """The API app; `state` carries what routers need (e.g. the daemon) into `app.state`."""
    app = FastAPI(
        title="reminders",
        version="1",
        description="Long-term recurring reminders over WeChat subscribe messages.",
        openapi_url=f"/{API_VERSION}/openapi.json" if "docs" in settings.api_public else None,
        docs_url=f"/{API_VERSION}/docs" if "docs" in settings.api_public else None,
        redoc_url=None,
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.store = store
    for key, value in state.items():
        setattr(app.state, key, value)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return ErrorResponse(
            error_body(exc.code, exc.message, **exc.details), exc.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"field": ".".join(str(p) for p in e["loc"]), "reason": e["msg"]} for e in exc.errors()
        ]
        return ErrorResponse(
            error_body("invalid_request", "the request does not match the API", problems=problems),
            422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ErrorResponse(error_body("http_error", str(exc.detail)), exc.status_code)

    @app.get("/healthz", tags=["health"], summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="The database answers")
    async def readyz() -> JSONResponse:
        try:
            await store.status.ping()
        except Exception as exc:  # any failure means not ready
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, 503)
        return JSONResponse({"status": "ready"})

    if "docs" not in settings.api_public:  # REMINDERS_API_PUBLIC leaves the docs out

        @app.get(f"/{API_VERSION}/openapi.json", include_in_schema=False)
        async def openapi(_: Annotated[Caller, Depends(require(None))]) -> JSONResponse:
            return JSONResponse(app.openapi())

    @app.get(f"/{API_VERSION}/token", tags=["auth"], summary="Which token is this")
    async def whoami(caller: Annotated[Caller, Depends(require(None))]) -> dict[str, Any]:
        return {"name": caller.name, "scopes": sorted(caller.scopes)}

    from scheduler.api import ingest, wechat_callback  # they import this module's helpers

    app.include_router(ingest.router)
    app.include_router(wechat_callback.router)

    from scheduler.api import admin  # imports this module's helpers too

    app.include_router(admin.router)
    app.include_router(admin.metrics_router)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
