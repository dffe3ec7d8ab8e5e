"""The ingestion API on loopback over a real PostgreSQL: consent accounting rule by rule,
enrolments, opens, the runway, CSV import, and bad input of every kind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest

from scheduler.cli import main
from scheduler.store.consent import ConsentStore
from scheduler.store.postgres import ClaimBatch, Due, Finished, Store
from tests.ingest_helpers import (
    ADMIN_ONLY,
    INGEST,
    LONG_TERM_TEMPLATE,
    ONE_TIME_TEMPLATE,
    alerts_plan,
    register,
    rehab_plan,
    serve,
)
from tests.wechat_pushes import change, event, signed_query, to_xml

U1 = "oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"
U2 = "oUpF8uHHHHHHHHHHHHHHHHHHHHHH"
T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)


@pytest.fixture
async def api(store: Store) -> AsyncIterator[httpx.AsyncClient]:
    await register(store, rehab_plan())
    await register(store, alerts_plan())
    async with serve(store) as client:
        yield client
    # Whatever a test did, the cache must be what the history says.
    assert await ConsentStore(store.pool).mismatches() == {}


async def popups(api, *items, status=200, headers=INGEST) -> dict:
    response = await api.post("/v1/consent", json={"popups": list(items)}, headers=headers)
    assert response.status_code == status, response.text
    return response.json()


def one_time(choice: str, user: str = U1, **kw) -> dict:
    return {"openid": user, "kind": "one_time", "results": {ONE_TIME_TEMPLATE: choice}, **kw}


def long_term(choice: str, user: str = U1) -> dict:
    return {"openid": user, "kind": "long_term", "results": {LONG_TERM_TEMPLATE: choice}}


async def state(api, template=ONE_TIME_TEMPLATE, user=U1) -> dict:
    body = (await api.get(f"/v1/consent/{user}", headers=INGEST)).json()
    found = [c for c in body["consent"] if c["template_id"] == template]
    if not found:
        return {"credits": 0, "long_term": False, "banned": False}
    return {k: found[0][k] for k in ("credits", "long_term", "banned")}


async def claim(store: Store, user: str = U1, occurrence: str = "step-1", plan_id="rehab"):
    one_time = plan_id == "rehab"
    batch = ClaimBatch(
        plan_id,
        1,
        ONE_TIME_TEMPLATE if one_time else LONG_TERM_TEMPLATE,
        "one_time" if one_time else "long_term",
        "test",
    )
    [c] = await store.claim(store.pool, batch, [Due(occurrence, user, 1, T0, {"thing1": "x"})])
    return c


# --- the accounting rules, one by one ------------------------------------------------------------


async def test_one_time_accepts_accumulate(api):
    body = await popups(api, one_time("accept"), one_time("accept"), one_time("accept"))
    assert body["recorded"] == 3
    assert body["consent"] == [
        {
            "openid": U1,
            "template_id": ONE_TIME_TEMPLATE,
            "credits": 3,
            "long_term": False,
            "banned": False,
        }
    ]


async def test_each_send_consumes_one_credit_with_its_claim(api, store):
    await popups(api, one_time("accept"), one_time("accept"))
    first = await claim(store, occurrence="step-1")
    second = await claim(store, occurrence="step-2")
    third = await claim(store, occurrence="step-3")
    assert (first.allowed, second.allowed, third.allowed) == (True, True, False)
    assert (await state(api))["credits"] == 0
    history = (await api.get(f"/v1/consent/{U1}", headers=INGEST)).json()["history"]
    consumed = [h for h in history if h["result"] == "consume"]
    assert [h["delivery_id"] for h in consumed] == [first.delivery_id, second.delivery_id]


async def test_a_popup_reject_keeps_credits_but_a_settings_reject_clears_them(api):
    await popups(api, one_time("accept"), one_time("accept"), one_time("reject"))
    assert (await state(api))["credits"] == 2
    doc = event("subscribe_msg_change_event", U1, [change(ONE_TIME_TEMPLATE)], 1_700_000_000)
    response = await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(doc))
    assert response.text == "success"
    assert await state(api) == {"credits": 0, "long_term": False, "banned": False}


async def test_43101_zeroes_credits_and_is_explained_by_the_history(api, store):
    await popups(api, one_time("accept"), one_time("accept"), one_time("accept"))
    c = await claim(store)
    await store.finish(
        ONE_TIME_TEMPLATE,
        "one_time",
        [Finished(c.delivery_id, "failed", "consent_gone", 43101, None, "no consent")],
    )
    assert (await state(api))["credits"] == 0
    history = (await api.get(f"/v1/consent/{U1}", headers=INGEST)).json()["history"]
    assert [(h["result"], h["source"]) for h in history][-2:] == [
        ("consume", "dispatcher"),
        ("exhausted", "wechat:43101"),
    ]


async def test_a_failed_send_refunds_its_credit(api, store):
    await popups(api, one_time("accept"))
    c = await claim(store)
    await store.finish(
        ONE_TIME_TEMPLATE,
        "one_time",
        [Finished(c.delivery_id, "failed", "transient", -1, None, "")],
    )
    assert (await state(api))["credits"] == 1


async def test_ban_blocks_sends_until_a_later_accept(api, store):
    await popups(api, one_time("accept"), one_time("accept"), one_time("ban"))
    assert await state(api) == {"credits": 2, "long_term": False, "banned": True}
    assert not (await claim(store, occurrence="step-1")).allowed
    await popups(api, one_time("reject"))
    assert (await state(api))["banned"]  # only an accept lifts it
    await popups(api, one_time("accept"))
    assert await state(api) == {"credits": 3, "long_term": False, "banned": False}
    assert (await claim(store, occurrence="step-2")).allowed


async def test_filter_changes_nothing_but_is_kept(api):
    await popups(api, one_time("accept"))
    await popups(api, one_time("filter"))
    assert (await state(api))["credits"] == 1
    history = (await api.get(f"/v1/consent/{U1}", headers=INGEST)).json()["history"]
    assert [h["result"] for h in history] == ["accept", "filter"]
    assert history[1]["source"] == "api:crm"


async def test_long_term_allows_repeated_sends_until_a_reject(api, store):
    await popups(api, long_term("accept"))
    for step in range(1, 4):
        assert (await claim(store, occurrence=f"d{step}", plan_id="alerts")).allowed
    assert (await state(api, LONG_TERM_TEMPLATE))["long_term"]
    await popups(api, long_term("reject"))
    assert not (await claim(store, occurrence="d4", plan_id="alerts")).allowed


async def test_recompute_from_history_repairs_a_damaged_cache(api, store):
    await popups(api, one_time("accept"), one_time("accept"), long_term("accept"))
    await store.pool.execute("UPDATE consent SET credits = 99, long_term = false")
    consent = ConsentStore(store.pool)
    assert len(await consent.mismatches()) == 2
    assert await consent.recompute() == 2
    assert (await state(api))["credits"] == 2
    assert (await state(api, LONG_TERM_TEMPLATE))["long_term"]


async def test_a_retried_popup_report_with_the_same_id_is_applied_once(api):
    first = await popups(api, one_time("accept", id="popup-1"))
    again = await popups(api, one_time("accept", id="popup-1"))
    assert (first["recorded"], again["recorded"], again["duplicates"]) == (1, 0, 1)
    assert (await state(api))["credits"] == 1


async def test_errmsg_in_the_forwarded_result_is_ignored(api):
    item = one_time("accept")
    item["results"]["errMsg"] = "requestSubscribeMessage:ok"
    assert (await popups(api, item))["recorded"] == 1


# --- bad input and credentials -------------------------------------------------------------------


async def no_consent_stored(store: Store) -> bool:
    return await store.pool.fetchval("SELECT count(*) FROM consent_events") == 0


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer nope"}, 401), (ADMIN_ONLY, 403)],
    ids=["missing", "wrong", "wrong-scope"],
)
async def test_credentials_are_required_and_nothing_is_stored(api, store, headers, status):
    await popups(api, one_time("accept"), status=status, headers=headers)
    assert await no_consent_stored(store)


@pytest.mark.parametrize(
    ("body", "status", "code", "needle"),
    [
        (b'{"popups": [', 422, "invalid_request", "JSON"),
        (b"[]", 422, "invalid_request", "object"),
        (
            {"popups": [one_time("accept", user="not an openid!")]},
            422,
            "invalid_request",
            "openid",
        ),
        (
            {"popups": [{**one_time("accept"), "results": {ONE_TIME_TEMPLATE: "yes"}}]},
            422,
            "invalid_request",
            "results",
        ),
        ({"popups": [{**one_time("accept"), "kind": "forever"}]}, 422, "invalid_request", "kind"),
        (
            {
                "popups": [
                    one_time("accept"),
                    {**one_time("accept"), "results": {"tmpl_x": "accept"}},
                ]
            },
            422,
            "unknown_template",
            "tmpl_x",
        ),
        (
            {"popups": [{**one_time("accept"), "kind": "long_term"}]},
            422,
            "kind_mismatch",
            "one_time",
        ),
        ({"popups": [one_time("accept")] * 2000}, 413, "body_too_large", "limited"),
    ],
    ids=[
        "malformed-json",
        "not-an-object",
        "bad-openid",
        "bad-result",
        "bad-kind",
        "unknown-template-in-a-batch",
        "kind-mismatch",
        "oversized",
    ],
)
async def test_bad_consent_input_is_refused_whole(api, store, body, status, code, needle):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await api.post(
        "/v1/consent", headers={**INGEST, "Content-Type": "application/json"}, **kwargs
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and needle in response.text
    assert await no_consent_stored(store)
    if code == "unknown_template":
        assert error["known"] == [LONG_TERM_TEMPLATE, ONE_TIME_TEMPLATE]
    # the daemon keeps serving
    assert (await popups(api, one_time("accept")))["recorded"] == 1
    await store.pool.execute("TRUNCATE consent_events, consent")


# --- enrolments ----------------------------------------------------------------------------------


async def test_enrol_one_and_many_computes_first_due(api, store):
    one = await api.post(
        "/v1/enrollments",
        headers=INGEST,
        json={
            "plan_id": "rehab",
            "openid": U1,
            "start": "2026-03-02T10:00:00+08:00",
            "tz": "Asia/Shanghai",
            "variables": {"patient": "张三"},
        },
    )
    assert one.status_code == 201, one.text
    assert one.json()["enrollments"][0]["next_due_at"] == "2026-03-09T01:00:00Z"
    many = await api.post(
        "/v1/enrollments",
        headers=INGEST,
        json={
            "enrollments": [
                {"plan_id": "rehab", "openid": f"o{i:04d}", "variables": {"patient": "p"}}
                for i in range(50)
            ]
            + [{"plan_id": "alerts", "openid": U2}]
        },
    )
    assert many.status_code == 201 and many.json()["enrolled"] == 51
    assert await store.pool.fetchval("SELECT count(*) FROM enrollments") == 52


@pytest.mark.parametrize(
    ("item", "status", "code", "needle"),
    [
        ({"plan_id": "nope", "openid": U1}, 404, "unknown_plan", "nope"),
        ({"plan_id": "rehab", "openid": U1}, 422, "invalid_enrollment", "patient"),
        (
            {"plan_id": "rehab", "openid": U1, "variables": {"patient": "p"}, "tz": "Mars/Base"},
            422,
            "invalid_enrollment",
            "IANA",
        ),
        (
            {"plan_id": "rehab", "openid": U1, "variables": {"patient": "p", "typo": "x"}},
            422,
            "invalid_enrollment",
            "typo",
        ),
        (
            {
                "plan_id": "rehab",
                "openid": U1,
                "variables": {"patient": "p"},
                "start": "2026-03-02T10:00",
            },
            422,
            "invalid_request",
            "timezone",
        ),
        (
            {"plan_id": "rehab", "openid": "a b", "variables": {"patient": "p"}},
            422,
            "invalid_request",
            "openid",
        ),
    ],
    ids=[
        "unknown-plan",
        "missing-variable",
        "bad-zone",
        "unknown-variable",
        "naive-start",
        "bad-openid",
    ],
)
async def test_bad_enrolments_store_nothing(api, store, item, status, code, needle):
    good = {"plan_id": "rehab", "openid": U2, "variables": {"patient": "p"}}
    response = await api.post("/v1/enrollments", headers=INGEST, json={"enrollments": [good, item]})
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code and needle in response.text
    assert await store.pool.fetchval("SELECT count(*) FROM enrollments") == 0


async def test_delete_stops_an_enrolment(api, store):
    await api.post(
        "/v1/enrollments",
        headers=INGEST,
        json={"plan_id": "rehab", "openid": U1, "variables": {"patient": "p"}},
    )
    response = await api.delete(f"/v1/enrollments/rehab/{U1}", headers=INGEST)
    assert response.json() == {"plan_id": "rehab", "openid": U1, "status": "stopped"}
    assert await store.pool.fetchval("SELECT status FROM enrollments") == "stopped"
    # one writer: the stop is in the audit, by the token that asked
    audit = await store.pool.fetch("SELECT action, actor, user_id FROM plan_events")
    assert [tuple(r) for r in audit if r["action"] == "stop_enrollment"] == [
        ("stop_enrollment", "api:crm", U1)
    ]
    twice = await api.delete(f"/v1/enrollments/rehab/{U1}", headers=INGEST)
    assert twice.status_code == 200  # DELETE is idempotent
    again = await api.delete(f"/v1/enrollments/rehab/{U1}x", headers=INGEST)
    assert again.status_code == 404 and again.json()["error"]["code"] == "unknown_enrollment"


# --- opens ---------------------------------------------------------------------------------------


async def test_opens_are_tied_to_their_delivery_once(api, store):
    await popups(api, one_time("accept"))
    c = await claim(store)
    body = {"opens": [{"openid": U1, "scene": 1014, "rmd": c.delivery_id, "at": T0.isoformat()}]}
    first = await api.post("/v1/opens", headers=INGEST, json=body)
    again = await api.post("/v1/opens", headers=INGEST, json=body)
    assert first.json() == {"recorded": 1, "duplicates": 0}
    assert again.json() == {"recorded": 0, "duplicates": 1}
    row = await store.pool.fetchrow("SELECT delivery_id, plan_id, scene FROM opens")
    assert tuple(row) == (c.delivery_id, "rehab", 1014)


@pytest.mark.parametrize(
    ("change_", "needle"),
    [({"scene": 1001}, "1014 or 1107"), ({"rmd": 999999}, "no delivery"), ({"openid": U2}, U2)],
    ids=["other-scene", "unknown-delivery", "someone-elses-delivery"],
)
async def test_bad_opens_are_refused(api, store, change_, needle):
    await popups(api, one_time("accept"))
    c = await claim(store)
    item = {"openid": U1, "scene": 1107, "rmd": c.delivery_id, **change_}
    response = await api.post("/v1/opens", headers=INGEST, json={"opens": [item]})
    assert response.status_code == 422 and needle in response.text
    assert await store.pool.fetchval("SELECT count(*) FROM opens") == 0


# --- the runway ----------------------------------------------------------------------------------


async def test_runway_names_the_users_who_run_dry_next(api, store):
    start = datetime.now(UTC) - timedelta(days=1)
    users = {"oA": 0, "oB": 1, "oC": 4}
    await api.post(
        "/v1/enrollments",
        headers=INGEST,
        json={
            "enrollments": [
                {
                    "plan_id": "rehab",
                    "openid": u,
                    "start": start.isoformat(),
                    "variables": {"patient": "p"},
                }
                for u in users
            ]
        },
    )
    for user, credits in users.items():
        for _ in range(credits):
            await popups(api, one_time("accept", user=user))
    report = (await api.get("/v1/plans/rehab/runway", headers=INGEST)).json()
    assert (report["enrolled"], report["dry_next"], report["dry_next_users"]) == (3, 1, ["oA"])
    assert report["covered_to_end"] == 1  # oC: 4 credits for 4 steps
    assert {u["openid"]: (u["steps_covered"], u["dry_step"]) for u in report["runs_dry"]} == {
        "oA": (0, 1),
        "oB": (1, 2),
    }
    missing = await api.get("/v1/plans/nope/runway", headers=INGEST)
    assert missing.status_code == 404


async def test_openapi_documents_the_ingestion_routes(api):
    paths = (await api.get("/v1/openapi.json")).json()["paths"]
    for path in (
        "/v1/consent",
        "/v1/enrollments",
        "/v1/enrollments/{plan_id}/{openid}",
        "/v1/opens",
        "/v1/plans/{plan_id}/runway",
        "/wechat/callback",
    ):
        assert path in paths, path


# --- CSV import (the CLI runs its own event loop: these tests are sync) --------------------------

PLANS = Path(__file__).parents[2] / "plans"


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(PLANS))
    return db_url


def fetchval(db_url: str, query: str):
    async def run():
        conn = await asyncpg.connect(db_url)
        try:
            return await conn.fetchval(query)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_csv_import_keeps_good_rows_and_reports_bad_ones_by_line(env, tmp_path, capsys):
    csv_file = tmp_path / "patients.csv"
    csv_file.write_text(
        "openid,start,tz,patient,hospital\n"
        "oA1,2026-03-02T10:00+08:00,Asia/Shanghai,张三,协和\n"
        "bad openid,2026-03-02T10:00+08:00,,李四,协和\n"
        "oA3,next week,,王五,协和\n"
        "oA4,2026-03-02T10:00,Europe/Paris,赵六,协和\n"
        "oA5,,Mars/Base,钱七,协和\n"
        "oA6,,,,协和\n"
        "oA1,2026-03-02T10:00+08:00,,张三,协和\n"
        "oA8,2026-03-02T10:00+08:00\n",
        encoding="utf-8",
    )
    assert main(["enroll", "rehab-weekly", "--csv", str(csv_file)]) == 1
    out, err = capsys.readouterr()
    assert "imported 2 enrolment(s)" in out and "6 row(s) rejected" in out
    for line, needle in [
        (3, "not an openid"),
        (4, "not an ISO date-time"),
        (6, "IANA"),
        (7, "needs: patient"),
        (8, "already on line 2"),
        (9, "fields"),
    ]:
        assert f"line {line}: " in err and needle in err.split(f"line {line}: ")[1].splitlines()[0]
    assert fetchval(env, "SELECT count(*) FROM enrollments") == 2
    # A row without an offset is read in its own zone.
    assert str(fetchval(env, "SELECT start_at FROM enrollments WHERE user_id = 'oA4'")) == (
        "2026-03-02 09:00:00+00:00"
    )


def test_csv_import_refuses_a_header_it_cannot_use(env, tmp_path, capsys):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("openid,patient,hospital,ward\noA1,a,b,c\n", encoding="utf-8")
    assert main(["enroll", "rehab-weekly", "--csv", str(csv_file)]) == 1
    assert "ward" in capsys.readouterr().err
    assert fetchval(env, "SELECT count(*) FROM enrollments") == 0


def test_runway_command(env, tmp_path, capsys):
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("openid,patient,hospital\noA1,a,b\n", encoding="utf-8")
    assert main(["enroll", "rehab-weekly", "--csv", str(csv_file)]) == 0
    capsys.readouterr()
    assert main(["runway", "rehab-weekly"]) == 0
    out = capsys.readouterr().out
    assert "run dry at the next step:  1" in out and "oA1" in out
    assert main(["runway", "rehab-weekly", "--json"]) == 0
    assert '"dry_next_users": [\n    "oA1"\n  ]' in capsys.readouterr().out
