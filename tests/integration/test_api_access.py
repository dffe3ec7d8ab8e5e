"""Who may reach /metrics and the OpenAPI document (REMINDERS_API_PUBLIC), and bad settings
reported as one line naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.errors import ConfigError
from scheduler.settings import Settings, load_settings
from scheduler.store.postgres import Store

TOKENS = {
    "crm": {"token": "ingest-secret-123", "scopes": ["ingest"]},
    "prometheus": {"token": "metrics-secret-789", "scopes": ["metrics"]},
    "ops": {"token": "admin-secret-456", "scopes": ["admin"]},
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]['token']}"}


@pytest.fixture
def serve(store: Store) -> Callable:
    @asynccontextmanager
    async def serving(**settings) -> AsyncIterator[httpx.AsyncClient]:
        server = ApiServer(
            create_app(Settings(api_tokens=TOKENS, **settings), store), "127.0.0.1", 0
        )
        await server.start()
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
                yield client
        finally:
            await server.stop()

    return serving


async def test_metrics_and_docs_are_public_by_default(serve):
    async with serve() as api:
        assert (await api.get("/metrics")).status_code == 200
        assert (await api.get("/v1/openapi.json")).json()["info"]["title"] == "reminders"
        assert (await api.get("/v1/docs")).status_code == 200


async def test_left_out_of_api_public_they_need_a_token(serve):
    async with serve(api_public=[]) as api:
        assert (await api.get("/metrics")).status_code == 401
        refused = await api.get("/metrics", headers=bearer("crm"))
        assert refused.status_code == 403 and "metrics" in refused.json()["error"]["message"]
        for name in ("prometheus", "ops"):
            scraped = await api.get("/metrics", headers=bearer(name))
            assert scraped.status_code == 200 and "reminders_plans" in scraped.text

        assert (await api.get("/v1/openapi.json")).status_code == 401
        doc = await api.get("/v1/openapi.json", headers=bearer("crm"))
        assert doc.status_code == 200 and "/v1/token" in doc.json()["paths"]
        assert (await api.get("/v1/docs")).status_code == 404  # the page cannot send a token


async def test_only_the_docs_can_be_public(serve):
    async with serve(api_public=["docs"]) as api:
        assert (await api.get("/v1/openapi.json")).status_code == 200
        assert (await api.get("/metrics")).status_code == 401


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("REMINDERS_API_TOKENS", "{bad", "REMINDERS_API_TOKENS: not valid JSON"),
        (
            "REMINDERS_API_TOKENS",
            '{"a": {"token": "x", "scopes": ["root"]}}',
            "REMINDERS_API_TOKENS (a.scopes.0): Input should be",
        ),
        ("REMINDERS_API_PUBLIC", '["everything"]', "REMINDERS_API_PUBLIC (0): Input should be"),
        ("REMINDERS_SEND_RATE", "-1", "REMINDERS_SEND_RATE: Input should be greater than"),
        (  # no sender at all: a fan-out would wait forever
            "REMINDERS_SEND_CONCURRENCY",
            "0",
            "REMINDERS_SEND_CONCURRENCY: Input should be greater than",
        ),
        ("REMINDERS_API_PORT", "eighty", "REMINDERS_API_PORT: Input should be a valid integer"),
        (  # a rule across two settings
            "REMINDERS_WECHAT_PUSH_MODE",
            "safe",
            "REMINDERS_WECHAT_PUSH_MODE=safe needs REMINDERS_WECHAT_ENCODING_AES_KEY",
        ),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch, variable, value, says):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert str(raised.value).startswith(says) and "\n" not in str(raised.value)


def reminders_run(**env: str) -> subprocess.CompletedProcess[str]:
    """`reminders run` as a process with these settings added to the environment."""
    return subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "run"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_reports_a_bad_setting_without_a_traceback(tmp_path):
    done = reminders_run(REMINDERS_API_TOKENS="{bad", REMINDERS_PLANS_DIR=str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "reminders: REMINDERS_API_TOKENS: not valid JSON: Expecting property name enclosed in"
        " double quotes: line 1 column 2 (char 1)"
    ]


def test_a_taken_api_port_is_one_line_and_exit_1(db_url, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = reminders_run(
            DATABASE_URL=db_url,
            REMINDERS_PLANS_DIR=str(tmp_path),
            REMINDERS_API_PORT=str(taken.getsockname()[1]),
            REMINDERS_LOG_LEVEL="ERROR",
        )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    [line] = [x for x in done.stderr.splitlines() if x.startswith("reminders:")]
    assert "cannot listen on 127.0.0.1:" in line and "REMINDERS_API_PORT" in line
