"""The admin API on loopback over a real PostgreSQL: scopes, plan actions, opt-outs, the audit
log, status, metrics, and the errors bad requests get."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.app.lifecycle import Lifecycle
from scheduler.settings import Settings
from scheduler.store.postgres import Store
from tests.support import Clock, audience, daily, register

TOKENS = {
    "crm": {"token": "ingest-secret-123", "scopes": ["ingest"]},
    "ops": {"token": "admin-secret-456", "scopes": ["admin"]},
}
ADMIN = {"Authorization": "Bearer admin-secret-456"}


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(api_tokens=TOKENS)
    lifecycle = Lifecycle(store, clock=Clock(datetime(2026, 3, 2, 2, 0, tzinfo=UTC)))
    server = ApiServer(create_app(settings, store, lifecycle=lifecycle), "127.0.0.1", 0)
    await server.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        yield client
    await server.stop()


@pytest.fixture
async def plan(store: Store) -> str:
    plan = daily()
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b"])
    return plan.id


async def test_admin_routes_need_the_admin_scope(api, plan):
    for headers, status in (({}, 401), ({"Authorization": "Bearer ingest-secret-123"}, 403)):
        response = await api.post(f"/v1/plans/{plan}/pause", json={"reason": "x"}, headers=headers)
        assert response.status_code == status
        assert (await api.get("/v1/plans", headers=headers)).status_code == status


async def test_pause_resume_cancel_over_http_with_the_audit_trail(api, plan):
    response = await api.post(f"/v1/plans/{plan}/pause", json={"reason": "typo"}, headers=ADMIN)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["state"], body["actor"], body["version"]) == ("paused", "token:ops", 1)

    again = await api.post(f"/v1/plans/{plan}/pause", json={"reason": "x"}, headers=ADMIN)
    assert again.status_code == 409 and "already paused" in again.json()["error"]["message"]

    response = await api.post(f"/v1/plans/{plan}/resume", json={"mode": "catch_up"}, headers=ADMIN)
    assert response.json()["details"]["mode"] == "catch_up"
    response = await api.post(f"/v1/plans/{plan}/resume", headers=ADMIN)
    assert response.status_code == 409 and response.json()["error"]["code"] == "invalid_transition"

    response = await api.post(f"/v1/plans/{plan}/cancel", json={"reason": "done"}, headers=ADMIN)
    assert response.json()["state"] == "cancelled"

    audit = (await api.get("/v1/audit", params={"plan": plan}, headers=ADMIN)).json()["events"]
    assert [(e["action"], e["actor"]) for e in audit] == [
        ("cancel", "token:ops"),
        ("resume", "token:ops"),
        ("pause", "token:ops"),
        ("loaded", "plan-file"),
    ]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/plans/nope/pause", {"reason": "x"}, 404, "unknown_plan"),
        ("/v1/plans/daily/pause", {}, 422, "invalid_request"),
        ("/v1/plans/daily/pause", {"reason": ""}, 422, "invalid_request"),
        ("/v1/plans/daily/cancel", {"reason": "x", "extra": 1}, 422, "invalid_request"),
        ("/v1/plans/daily/resume", {"mode": "later"}, 422, "invalid_request"),
        ("/v1/users/o-a/opt-out", {"plan": "nope", "reason": "x"}, 404, "unknown_plan"),
        ("/v1/users/o-a/opt-out", {"plan": "daily"}, 422, "reason_required"),
        ("/v1/enrollments/daily/o-zz/stop", {"reason": "x"}, 404, "unknown_enrollment"),
    ],
)
async def test_bad_requests_are_refused_and_change_nothing(
    api, plan, store, path, body, status, code
):
    before = await store.pool.fetchval("SELECT count(*) FROM plan_events")
    response = await api.post(path, json=body, headers=ADMIN)
    assert (response.status_code, response.json()["error"]["code"]) == (status, code)
    assert await store.pool.fetchval("SELECT count(*) FROM plan_events") == before
    assert (await store.plan("daily")).state == "active"


async def test_opt_out_and_back_in(api, plan):
    url = "/v1/users/o-a/opt-out"
    response = await api.post(url, json={"reason": "user asked"}, headers=ADMIN)
    assert response.status_code == 200 and response.json()["plan_id"] is None
    response = await api.post(url, json={"plan": plan, "reason": "user asked"}, headers=ADMIN)
    assert response.status_code == 200
    listed = (await api.get("/v1/users/o-a/opt-outs", headers=ADMIN)).json()["opt_outs"]
    assert [o["plan_id"] for o in listed] == [None, plan] or [o["plan_id"] for o in listed] == [
        plan,
        None,
    ]
    assert (await api.post("/v1/users/o-a/opt-in", headers=ADMIN)).status_code == 200
    again = await api.post("/v1/users/o-a/opt-in", headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"]["code"] == "not_opted_out"


async def test_status_and_metrics(api, plan, store):
    plans = (await api.get("/v1/plans", headers=ADMIN)).json()
    assert [p["id"] for p in plans["plans"]] == [plan]
    detail = (await api.get(f"/v1/plans/{plan}", params={"next": 3}, headers=ADMIN)).json()
    assert detail["state"] == "active" and len(detail["next_fires"]) == 3
    assert detail["next_fires"][0]["local"] == "2026-03-03T09:00:00+08:00"
    assert (await api.get("/v1/plans/nope", headers=ADMIN)).status_code == 404

    metrics = await api.get("/metrics")  # unauthenticated, as scrapers expect
    assert metrics.status_code == 200
    assert 'reminders_plans{state="active"} 1.0' in metrics.text
    assert "reminders_send_latency_seconds_bucket" in metrics.text


async def test_reload_notifies_every_replica(api, store):
    heard: list[str] = []

    def listener(*args: object) -> None:
        heard.append(str(args[-1]))

    async with store.pool.acquire() as conn:
        await conn.add_listener("reminders_control", listener)
        try:
            response = await api.post("/v1/reload", headers=ADMIN)
            for _ in range(50):
                if heard:
                    break
                await conn.execute("SELECT 1")
        finally:
            await conn.remove_listener("reminders_control", listener)
    assert response.json() == {"status": "requested"}
    assert heard == ['{"kind": "reload"}']


async def test_fan_outs_under_way_over_http_and_in_the_metrics(api, plan, store):
    fire = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    await store.fanout.record_occurrence(plan, fire.isoformat(), 1, fire, 1)
    await store.fanout.take_chunk("r-busy")

    response = await api.get("/v1/fan-outs", headers=ADMIN)
    assert response.status_code == 200
    [running] = response.json()["fan_outs"]
    assert (running["plan_id"], running["total"], running["holders"]) == (plan, 2, ["r-busy"])
    assert (running["chunks"], running["chunks_left"]) == (3, 3)  # (start, o-a], (o-a, o-b], rest
    assert (await api.get("/v1/fan-outs")).status_code == 401
    metrics = (await api.get("/metrics")).text
    assert f'reminders_fanouts_running{{condition="all",plan_id="{plan}"}} 1.0' in metrics
    assert f'reminders_fanout_users_left{{plan_id="{plan}"}} 2.0' in metrics
