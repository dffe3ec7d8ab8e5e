"""Plans and an API server for the ingestion tests (real PostgreSQL, real HTTP on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.domain.plan import Plan
from scheduler.settings import Settings
from scheduler.store.postgres import Store
from tests.support import register  # noqa: F401 - the ingest tests take it from here
from tests.wechat_pushes import APPID, ENCODING_AES_KEY, TOKEN

TOKENS = {
    "crm": {"token": "ingest-secret-123", "scopes": ["ingest"]},
    "ops": {"token": "admin-secret-456", "scopes": ["admin"]},
}
INGEST = {"Authorization": "Bearer ingest-secret-123"}
ADMIN_ONLY = {"Authorization": "Bearer admin-secret-456"}

ONE_TIME_TEMPLATE = "tmpl_rehab"
LONG_TERM_TEMPLATE = "tmpl_alert"


def rehab_plan(count: int = 4) -> Plan:
    """One-time consent, weekly, relative to each enrolment."""
    return Plan.model_validate(
        {
            "id": "rehab",
            "name": "Rehab",
            "category": "medical",
            "consent": "one_time",
            "schedule": {
                "relative": {"every": "1 week", "count": count, "at": "09:00"},
                "grace": "2 hours",
            },
            "template": {
                "id": ONE_TIME_TEMPLATE,
                "fields": {"thing1": "thing"},
                "page": "pages/rehab/index?from=notice",
            },
            "message": {"default": {"thing1": "Week {step} {patient} 仅供参考"}},
            "variables": ["patient"],
        }
    )


def alerts_plan() -> Plan:
    """Long-term consent, a calendar plan."""
    return Plan.model_validate(
        {
            "id": "alerts",
            "name": "Alerts",
            "category": "transport",
            "consent": "long_term",
            "schedule": {
                "calendar": {"timezone": "Asia/Shanghai", "daily": {"at": "09:00"}},
            },
            "template": {"id": LONG_TERM_TEMPLATE, "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": "Line 2 delayed"}},
        }
    )


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "api_tokens": TOKENS,
        "max_body_bytes": 64_000,
        "wechat_callback_token": TOKEN,
        "wechat_encoding_aes_key": ENCODING_AES_KEY,
        "wechat_appid": APPID,
        "wechat_push_mode": "compatible",  # plaintext and encrypted pushes; test_push_auth: safe
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def serve(store: Store, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    server = ApiServer(create_app(settings(**overrides), store), "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop()
