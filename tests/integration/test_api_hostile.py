"""Hostile requests at the API, on loopback over a real PostgreSQL: whatever PostgreSQL or Python
cannot store or represent is a 422 naming the field (never a 5xx), the refusal itself is always
encodable, and concurrent admin calls never fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

from scheduler.store.postgres import Store
from tests.ingest_helpers import ADMIN_ONLY, INGEST, alerts_plan, register, rehab_plan, serve

U1 = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    await register(store, rehab_plan())
    await register(store, alerts_plan())
    async with serve(store, max_body_bytes=1_048_576) as client:
        yield client


def enrol(**item) -> dict:
    return {"plan_id": "rehab", "openid": U1, "variables": {"patient": "Li"}, **item}


def raw(body: dict, fragment: str) -> str:
    """`body` as JSON text with "@@" replaced by `fragment` (what json.dumps cannot write)."""
    return json.dumps(body).replace('"@@"', fragment)


def opens(**item) -> dict:
    return {"opens": [{"openid": U1, "scene": 1014, **item}]}


def popup(**item) -> dict:
    return {
        "popups": [{"openid": U1, "kind": "one_time", "results": {"tmpl_rehab": "accept"}} | item]
    }


# (method, path, JSON body or raw text, the field the 422 must name)
HOSTILE = {
    "nul-variable": (
        "POST",
        "/v1/enrollments",
        enrol(variables={"patient": "a\x00b"}),
        "body.one.variables.patient",
    ),
    "nul-variable-name": (
        "POST",
        "/v1/enrollments",
        enrol(variables={"pat\x00": "x"}),
        "body.one.variables.pat\x00.[key]",
    ),
    "nul-plan-id": ("POST", "/v1/enrollments", enrol(plan_id="re\x00hab"), "body.one.plan_id"),
    "nul-tz": ("POST", "/v1/enrollments", enrol(tz="Asia/\x00"), "body.one.tz"),
    "long-tz": ("POST", "/v1/enrollments", enrol(tz="A" * 300), "body.one.tz"),
    "long-variable": (
        "POST",
        "/v1/enrollments",
        enrol(variables={"patient": "x" * 1001}),
        "body.one.variables.patient",
    ),
    "too-many-variables": (
        "POST",
        "/v1/enrollments",
        enrol(variables={f"v{i}": "x" for i in range(65)}),
        "body.one.variables",
    ),
    "infinite-variable": (
        "POST",
        "/v1/enrollments",
        raw(enrol(variables={"patient": "@@"}), "1e400"),
        "body.one.variables.patient",
    ),
    "huge-int-variable": (
        "POST",
        "/v1/enrollments",
        enrol(variables={"patient": 2**64}),
        "body.one.variables.patient",
    ),
    "start-year-9999": (
        "POST",
        "/v1/enrollments",
        enrol(start="9999-12-31T23:00:00-05:00"),
        "body.one.start",
    ),
    "start-year-1": (
        "POST",
        "/v1/enrollments",
        enrol(start="0001-01-01T00:30:00+05:00"),
        "body.one.start",
    ),
    "surrogate-variable": (
        "POST",
        "/v1/enrollments",
        raw(enrol(variables={"patient": "@@"}), '"\\ud800"'),
        "body.one.variables.patient",
    ),
    "surrogate-key": (
        "POST",
        "/v1/enrollments",
        raw(enrol(**{"@@": 1}), '"\\udc80"'),
        "body.one",
    ),
    "rmd-beyond-int64": ("POST", "/v1/opens", opens(rmd=2**63), "body.opens.0.rmd"),
    "scene-beyond-int32": ("POST", "/v1/opens", opens(scene=2**40), "body.opens.0.scene"),
    "open-at-year-9999": (
        "POST",
        "/v1/opens",
        opens(at="9999-12-31T23:59:59-01:00"),
        "body.opens.0.at",
    ),
    "nul-popup-id": ("POST", "/v1/consent", popup(id="p\x00"), "body.popups.0.id"),
    "nul-template": (
        "POST",
        "/v1/consent",
        popup(results={"t\x00": "accept"}),
        "body.popups.0.results.t\x00.[key]",
    ),
    "popup-at-year-1": (
        "POST",
        "/v1/consent",
        popup(at="0001-01-01T00:00:00+01:00"),
        "body.popups.0.at",
    ),
    "nul-consent-query": ("GET", f"/v1/consent/{U1}?template_id=%00", None, "query.template_id"),
    "nul-runway-path": ("GET", "/v1/plans/re%00hab/runway", None, "path.plan_id"),
    "nul-delete-path": ("DELETE", f"/v1/enrollments/re%00hab/{U1}", None, "path.plan_id"),
    "nul-pause-path": ("POST", "/v1/plans/da%00ily/pause", {"reason": "x"}, "path.plan_id"),
    "nul-pause-reason": ("POST", "/v1/plans/alerts/pause", {"reason": "x\x00"}, "body.reason"),
    "nul-opt-out-user": ("POST", "/v1/users/o%00a/opt-out", {"reason": "x"}, "path.user_id"),
    "nul-opt-out-plan": (
        "POST",
        "/v1/users/oa/opt-out",
        {"plan": "\x00", "reason": "x"},
        "body.plan",
    ),
    "nul-audit-query": ("GET", "/v1/audit?plan=%00", None, "query.plan"),
    "nul-stop-path": ("POST", "/v1/enrollments/rehab/o%00/stop", {"reason": "x"}, "path.user_id"),
}


def headers_for(path: str) -> dict[str, str]:
    admin = path.startswith(("/v1/users", "/v1/audit")) or path.endswith(("/stop", "/pause"))
    return {**(ADMIN_ONLY if admin else INGEST), "Content-Type": "application/json"}


async def test_what_cannot_be_stored_is_a_422_naming_the_field(api, store):
    wrong = {}
    for case, (method, path, body, field) in HOSTILE.items():  # one server for all: fast
        content = body if isinstance(body, str) or body is None else json.dumps(body)
        response = await api.request(method, path, content=content, headers=headers_for(path))
        if response.status_code != 422:
            wrong[case] = (response.status_code, response.text[:200])
            continue
        # The refusal is encodable JSON that parses.
        problems = json.loads(response.content)["error"].get("problems", [])
        if field not in [p["field"] for p in problems]:
            wrong[case] = problems
    assert wrong == {}
    assert await store.pool.fetchval("SELECT count(*) FROM enrollments") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM consent_events") == 0


async def test_the_edges_of_the_ranges_are_accepted(api, store):
    response = await api.post(
        "/v1/enrollments",
        json=enrol(start="2099-12-31T23:59:59+00:00", variables={"patient": "x" * 1000}),
        headers=INGEST,
    )
    assert response.status_code == 201, response.text
    response = await api.post(
        "/v1/opens", json=opens(rmd=2**63 - 1, at="2000-01-01T08:00:00+08:00"), headers=INGEST
    )
    assert response.status_code == 422  # no such delivery, but no overflow either
    assert response.json()["error"]["code"] == "invalid_open"


async def test_concurrent_admin_calls_never_fail(api, store):
    async def round_of_calls(plan_id: str) -> list[httpx.Response]:
        calls = [
            api.post(f"/v1/plans/{plan_id}/pause", json={"reason": "x"}, headers=ADMIN_ONLY),
            api.post(f"/v1/plans/{plan_id}/resume", json={"mode": "catch_up"}, headers=ADMIN_ONLY),
            api.post(f"/v1/plans/{plan_id}/cancel", json={"reason": "x"}, headers=ADMIN_ONLY),
            api.get("/v1/plans", headers=ADMIN_ONLY),
            api.get(f"/v1/plans/{plan_id}", headers=ADMIN_ONLY),
            api.get("/v1/fan-outs", headers=ADMIN_ONLY),
        ]
        return await asyncio.gather(*calls)

    rounds = await asyncio.gather(*(round_of_calls(("rehab", "alerts")[i % 2]) for i in range(8)))
    failed = [
        (r.request.url.path, r.status_code, r.text)
        for rs in rounds
        for r in rs
        if r.status_code >= 500
    ]
    assert failed == []
