"""The API's shared behaviour, served on loopback over a real PostgreSQL: authentication, body
limits, error shapes, health and the OpenAPI document."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.errors import ConfigError
from scheduler.settings import Settings
from scheduler.store.postgres import Store

TOKENS = {
    "crm": {"token": "ingest-secret-123", "scopes": ["ingest"]},
    "ops": {"token": "admin-secret-456", "scopes": ["admin", "ingest"]},
}


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(api_tokens=TOKENS, max_body_bytes=1000)
    server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield client
    await server.stop()


async def test_health_and_readiness(api):
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready"}


async def test_openapi_document_is_served(api):
    doc = (await api.get("/v1/openapi.json")).json()
    assert doc["info"]["title"] == "reminders" and "/v1/token" in doc["paths"]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthenticated"),
        ({"Authorization": "Bearer wrong"}, 401, "unauthenticated"),
        ({"Authorization": "Basic aW5nZXN0"}, 401, "unauthenticated"),
        ({"Authorization": "Bearer ingest-secret-12"}, 401, "unauthenticated"),  # a prefix
    ],
    ids=["missing", "wrong", "not-bearer", "prefix"],
)
async def test_bad_credentials_are_refused(api, headers, status, code):
    response = await api.get("/v1/token", headers=headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.headers["www-authenticate"] == "Bearer"


async def test_a_valid_token_names_its_caller(api):
    response = await api.get("/v1/token", headers={"Authorization": "Bearer admin-secret-456"})
    assert response.json() == {"name": "ops", "scopes": ["admin", "ingest"]}


async def test_an_oversized_body_gets_413_before_any_route_runs(api):
    response = await api.post("/v1/token", content=b"x" * 5000)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"


async def test_a_port_in_use_is_a_clear_error(store):
    settings = Settings()
    first = ApiServer(create_app(settings, store), "127.0.0.1", 0)
    await first.start()
    try:
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1"):
            await ApiServer(create_app(settings, store), "127.0.0.1", first.port).start()
    finally:
        await first.stop()
