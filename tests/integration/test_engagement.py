"""Engagement figures (docs/engagement.md) from a virtual-time scenario through the real
dispatcher and gate, a fake WeChat on loopback, the real ingestion API (opens, popups) and
WeChat's real callback (sent events, the settings switch, popups): exact counts per step and day,
unique opens, cancellations attributed to the right delivery (late, out of order, outside the
window, via 43101), and the surfaces: `reminders report`, `status`, the admin API, /metrics."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from prometheus_client import REGISTRY

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.app import engagement, metrics
from scheduler.app.lifecycle import Lifecycle
from scheduler.app.status import plan_status, render_plan
from scheduler.cli import main
from scheduler.store.postgres import Store
from tests.ingest_helpers import ADMIN_ONLY, INGEST, settings
from tests.ops_helpers import channel_fixture, consent_checking_fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, dispatcher, plan_of, register
from tests.wechat_pushes import change, event, popup, sent, signed_query, to_xml

TEMPLATE = "tmpl_tips"
PLAN = plan_of(
    {
        "id": "daily-tips",
        "name": "Daily tips",
        "category": "transport",
        "consent": "long_term",
        "schedule": {
            "calendar": {
                "timezone": "Asia/Shanghai",
                "daily": {"at": "09:00"},
                "start": "2026-03-01",
            },
            "grace": "1 hour",
        },
        "template": {"id": TEMPLATE, "fields": {"thing1": "thing"}, "page": "pages/tips/index"},
        "message": {"default": {"thing1": "Tip {step}"}},
    }
)
U1, U2, U3, U4, U5 = USERS = [f"oTips{i}" for i in range(1, 6)]


def at(day: int, hour: int = 1, minute: int = 0) -> datetime:
    """March `day`, 2026, UTC. 01:00 UTC is 09:00 in Shanghai: step n fires on March n."""
    return datetime(2026, 3, day, hour, minute, tzinfo=UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2))


@pytest.fixture
async def api(store: Store, clock: Clock, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings(plans_dir=tmp_path), store, lifecycle=Lifecycle(store, clock=clock))
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            yield client
    finally:
        await server.stop()


async def push(api: httpx.AsyncClient, doc: dict) -> None:
    response = await api.post(f"/wechat/callback?{signed_query()}", content=to_xml(doc))
    assert response.text == "success", response.text


async def sent_event(api, user: str, msgid: int, code: int = 0) -> None:
    ts = int(at(9).timestamp())
    await push(api, event("subscribe_msg_sent_event", user, [sent(TEMPLATE, msgid, code)], ts))


async def opens(api, *items: tuple[str, int | None, datetime], duplicates: int = 0) -> None:
    body = {
        "opens": [
            {"openid": u, "scene": 1014, **({"rmd": rmd} if rmd else {}), "at": t.isoformat()}
            for u, rmd, t in items
        ]
    }
    response = await api.post("/v1/opens", headers=INGEST, json=body)
    assert response.status_code == 200, response.text
    assert response.json() == {"recorded": len(items) - duplicates, "duplicates": duplicates}


async def popup_reject(api, user: str, when: datetime, choice: str = "reject") -> None:
    item = {"openid": user, "kind": "long_term", "results": {TEMPLATE: choice}}
    response = await api.post(
        "/v1/consent", headers=INGEST, json={"popups": [{**item, "at": when.isoformat()}]}
    )
    assert response.status_code == 200, response.text


async def scenario(store, fake, channel, clock, api) -> None:
    """Five users, steps 2-5 of a daily plan (March 2-5), and what they did (see each line)."""
    await register(store, PLAN)
    for user in USERS:
        await store.enroll(PLAN.id, user, at(1), "Asia/Shanghai", {}, None)
        await store.record_consent(user, TEMPLATE, "long_term", "accept", "test")
        fake.grant(user, TEMPLATE, "long_term")
    d = dispatcher(store, channel, clock, concurrency=1)

    async def fire(day: int) -> dict[str, tuple[int, int]]:
        """Fire March `day`; who got a message: user -> (delivery id, msgid)."""
        before = len(fake.messages)
        clock.now = at(day, 1, 1)
        await d.fire(PLAN.id, at(day))
        got = {}
        for m in fake.messages[before:]:
            rmd = int(parse_qs(urlsplit(m["page"]).query)["rmd"][0])
            got[m["touser"]] = (rmd, m["msgid"])
        return got

    # March 2, step 2: all five get it; WeChat's sent events say four were delivered.
    day2 = await fire(2)
    assert sorted(day2) == USERS
    for user in (U1, U2, U3, U4):
        await sent_event(api, user, day2[user][1])
    await sent_event(api, U5, day2[U5][1], code=10003)  # accepted, then not delivered
    # U1 opens it twice (one report retried), U4 opens the mini program without a tracked card.
    first_open = (U1, day2[U1][0], at(2, 2))
    await opens(api, first_open, first_open, (U1, day2[U1][0], at(2, 5)), duplicates=1)
    await opens(api, (U4, None, at(2, 6)))
    # U3 switches the template off in settings at noon: WeChat pushes the change.
    change_at = int(at(2, 12).timestamp())
    await push(api, event("subscribe_msg_change_event", U3, [change(TEMPLATE)], change_at))
    fake.revoke(U3, TEMPLATE)
    # U4 switches it off too, but that push never reaches us: the next send gets 43101.
    fake.revoke(U4, TEMPLATE)

    # March 3, step 3: U3 is skipped (no consent), U4's send fails with 43101.
    day3 = await fire(3)
    assert sorted(day3) == [U1, U2, U5]
    gone = await store.pool.fetchrow(
        "SELECT status, reason, errcode FROM deliveries WHERE user_id = $1 AND step = 3", U4
    )
    assert tuple(gone) == ("failed", "consent_gone", 43101)
    await opens(api, (U5, day3[U5][0], at(3, 3)))  # opened before its sent event came
    for user in (U1, U2, U5):
        await sent_event(api, user, day3[user][1])

    # March 4 and 5, steps 4 and 5: no sent events for them yet.
    day4 = await fire(4)
    assert sorted(day4) == [U1, U2, U5]
    await opens(api, (U2, day2[U2][0], at(2, 10)))  # a late open: step 2, reported on day 4
    day5 = await fire(5)
    assert sorted(day5) == [U1, U2, U5]

    # U5 chooses "always reject" in a popup on the morning of March 5: the backend reports the
    # ban, WeChat's push a reject.
    await popup_reject(api, U5, at(5, 5), "ban")
    popup_at = int(at(5, 5).timestamp())
    await push(api, event("subscribe_msg_popup_event", U5, [popup(TEMPLATE, "reject")], popup_at))
    # U1 rejected in a popup on the evening of March 3; the report arrives 2 days later, after
    # steps 4 and 5 went out: it is step 3's (the last delivery before it).
    await popup_reject(api, U1, at(3, 20))
    # U2 rejects 74 hours after its last delivery (step 5): outside the 72 h window.
    await popup_reject(api, U2, at(8, 3))
    clock.now = at(5, 12)


EXPECTED_STEPS = [
    # version, step, sent, delivered, opened, cancelled
    (1, 2, 5, 4, 2, 2),  # U3 (settings), U4 (43101 on step 3); U5's never delivered
    (1, 3, 3, 3, 1, 1),  # U1's late popup reject
    (1, 4, 3, 0, 0, 0),
    (1, 5, 3, 0, 0, 1),  # U5, reported twice; U2's is outside the window
]


def figures_of(rows: list[dict], *keys: str) -> list[tuple]:
    return [
        (*(r[k] for k in keys), r["sent"], r["delivered"], r["opened"], r["cancelled"])
        for r in rows
    ]


async def test_rates_per_step_and_day_with_late_and_out_of_order_events(
    store, fake, channel, clock, api, db_url, capsys, monkeypatch, tmp_path
):
    await scenario(store, fake, channel, clock, api)
    now = clock.now

    by_step = await engagement.report(store, PLAN.id, now=now, by="step")
    assert figures_of(by_step["rows"], "version", "step") == EXPECTED_STEPS
    step2 = by_step["rows"][0]
    assert (step2["click_through"], step2["cancellation_rate"]) == (0.4, 0.4)
    assert by_step["total"] == {
        "sent": 14,
        "delivered": 7,
        "opened": 3,
        "click_through": round(3 / 14, 4),
        "cancelled": 4,
        "cancellation_rate": round(4 / 14, 4),
    }
    # The windows before March 5, 12:00 UTC: step 5 is the last 24 hours'.
    assert figures_of([by_step["windows"]["24h"]]) == [(3, 0, 0, 1)]
    assert figures_of([by_step["windows"]["7d"]]) == [(14, 7, 3, 4)]

    # Per local day (Asia/Shanghai): the late cancellation is March 3's, the day of its delivery.
    by_day = await engagement.report(store, PLAN.id, now=now, by="day")
    assert figures_of(by_day["rows"], "day") == [
        ("2026-03-02", 5, 4, 2, 2),
        ("2026-03-03", 3, 3, 1, 1),
        ("2026-03-04", 3, 0, 0, 0),
        ("2026-03-05", 3, 0, 0, 1),
    ]
    # A range of days, and variants (one, "default", until steps have variants).
    some = await engagement.report(store, PLAN.id, now=now, by="variant", start=at(3).date())
    assert figures_of(some["rows"], "step", "variant") == [
        (3, "default", 3, 3, 1, 1),
        (4, "default", 3, 0, 0, 0),
        (5, "default", 3, 0, 0, 1),
    ]
    # A 24 h window: U4's 43101 came exactly 24 hours after step 2, so it is no longer step 2's.
    narrow = await engagement.report(store, PLAN.id, now=now, window=timedelta(hours=24))
    assert [r["cancelled"] for r in narrow["rows"]] == [1, 1, 0, 1]

    # `reminders status PLAN` shows the windows and the steps.
    status = await plan_status(store, PLAN.id, now=now)
    assert figures_of([status["engagement"]["windows"]["all"]]) == [(14, 7, 3, 4)]
    text = render_plan(status)
    assert "engagement" in text and "v1 step 2" in text and "40.0%" in text

    # /metrics: the gauges for the last 24 hours and 7 days.
    await metrics.refresh_engagement(store, now=now, window=None)

    def gauge(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"plan": PLAN.id, **labels})

    assert gauge("reminders_engagement", window="7d", figure="cancelled") == 4
    assert gauge("reminders_engagement", window="24h", figure="sent") == 3
    assert gauge("reminders_engagement_rate", window="24h", rate="click_through") == 0
    assert gauge("reminders_engagement_rate", window="7d", rate="cancellation") == round(4 / 14, 4)

    # `reminders report` as CSV and JSON (the CLI runs its own event loop: in a thread).
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(tmp_path))
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["report", PLAN.id, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [
        tuple(int(r[k]) for k in ("version", "step", "sent", "delivered", "opened", "cancelled"))
        for r in rows
    ] == EXPECTED_STEPS
    assert rows[0]["click_through"] == "0.4" and rows[2]["click_through"] == "0.0"
    argv = ["report", PLAN.id, "--by", "day", "--from", "2026-03-03", "--to", "2026-03-04"]
    assert await asyncio.to_thread(main, [*argv, "--format", "json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert figures_of(body["rows"], "day") == [
        ("2026-03-03", 3, 3, 1, 1),
        ("2026-03-04", 3, 0, 0, 0),
    ]
    assert (body["tz"], body["attribution_window_hours"]) == ("Asia/Shanghai", 72)
    assert await asyncio.to_thread(main, ["report", PLAN.id]) == 0
    table = capsys.readouterr().out  # as in docs/engagement.md
    assert table.splitlines()[1].split()[:3] == ["VERSION", "STEP", "SENT"]
    assert table.splitlines()[-1].split() == ["total", "14", "7", "3", "21.4%", "4", "28.6%"]


async def test_admin_api_serves_the_figures_and_refuses_bad_queries_with_422(
    store, fake, channel, clock, api
):
    await scenario(store, fake, channel, clock, api)
    url = f"/v1/plans/{PLAN.id}/engagement"

    response = await api.get(url, headers=ADMIN_ONLY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert figures_of(body["rows"], "version", "step") == EXPECTED_STEPS
    assert body["as_of"] == clock.now.isoformat()  # the API's clock: the windows are virtual too
    assert figures_of([body["windows"]["24h"]]) == [(3, 0, 0, 1)]

    query = {"by": "day", "from": "2026-03-03", "to": "2026-03-03", "tz": "UTC"}
    day3 = (await api.get(url, headers=ADMIN_ONLY, params=query)).json()
    assert figures_of(day3["rows"], "day") == [("2026-03-03", 3, 3, 1, 1)]

    status = (await api.get(f"/v1/plans/{PLAN.id}", headers=ADMIN_ONLY)).json()
    assert figures_of(status["engagement"]["steps"], "step") == [s[1:] for s in EXPECTED_STEPS]

    for params, needle in [
        ({"from": "2026-03-05", "to": "2026-03-01"}, "after"),
        ({"from": "0001-01-01"}, "between"),
        ({"to": "9999-12-31"}, "between"),
        ({"from": "yesterday"}, "date"),
        ({"by": "week"}, "by"),
        ({"tz": "Mars/Olympus"}, "IANA"),
        ({"tz": "Asia"}, "IANA"),
        ({"tz": "../../etc/passwd"}, "IANA"),
        ({"tz": "x" * 65}, "tz"),
    ]:
        response = await api.get(url, headers=ADMIN_ONLY, params=params)
        assert response.status_code == 422, (params, response.text)
        assert needle in response.text, (params, response.text)
    assert (await api.get("/v1/plans/nope/engagement", headers=ADMIN_ONLY)).status_code == 404
    assert (await api.get(url, headers=INGEST)).status_code == 403


def tips_at(plan_id: str, at_: str) -> object:
    """A daily plan of the shared template at `at_` (Shanghai)."""
    document = PLAN.model_dump(mode="json")
    document["id"] = plan_id
    document["schedule"]["calendar"]["daily"] = {"at": at_}
    return plan_of(document)


async def test_plans_sharing_a_template_share_cancellations_by_the_last_delivery(
    store, fake, channel, clock, api, db_url, capsys, monkeypatch, tmp_path
):
    morning, evening = tips_at("tips-morning", "09:00"), tips_at("tips-evening", "18:00")
    for plan in (morning, evening):
        await register(store, plan)
    for user in (U1, U2, U3):
        await store.enroll(morning.id, user, at(1), "Asia/Shanghai", {}, None)
        await store.record_consent(user, TEMPLATE, "long_term", "accept", "test")
        fake.grant(user, TEMPLATE, "long_term")
    for user in (U1, U3):  # they get both
        await store.enroll(evening.id, user, at(1), "Asia/Shanghai", {}, None)
    d = dispatcher(store, channel, clock)
    for plan, fire in ((morning, at(2, 1)), (evening, at(2, 10))):
        clock.now = fire
        await d.fire(plan.id, fire)
    assert len(fake.messages) == 5
    evening_to_u3 = next(m for m in fake.messages[3:] if m["touser"] == U3)
    await sent_event(api, U3, evening_to_u3["msgid"], code=10003)  # never reached U3
    # All reject at 20:00 Shanghai: U1's last message was the evening one, U2's the morning's,
    # and U3's the morning's too (it never saw the evening one).
    for user in (U1, U2, U3):
        await popup_reject(api, user, at(2, 12))
    clock.now = at(3)

    def cancelled(report: dict) -> list[tuple[int, int]]:
        return [(r["sent"], r["cancelled"]) for r in report["rows"]]

    assert cancelled(await engagement.report(store, morning.id, now=clock.now)) == [(3, 2)]
    assert cancelled(await engagement.report(store, evening.id, now=clock.now)) == [(2, 1)]

    # The policy's window (the plans folder's policy.yaml): 1 hour leaves U1's (2 h) out.
    (tmp_path / "policy.yaml").write_text("engagement:\n  attribution_window: 1 hour\n")
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REMINDERS_PLANS_DIR", str(tmp_path))
    capsys.readouterr()
    for plan_id, expected in ((evening.id, [(2, 0)]), (morning.id, [(3, 0)])):
        argv = ["report", plan_id, "--format", "json"]
        assert await asyncio.to_thread(main, argv) == 0
        body = json.loads(capsys.readouterr().out)
        assert (body["attribution_window_hours"], cancelled(body)) == (1, expected)
    assert await asyncio.to_thread(main, ["report", "nope"]) == 1
    assert await asyncio.to_thread(main, ["report", morning.id, "--tz", "Mars/Base"]) == 1
    assert "IANA" in capsys.readouterr().err
