"""Stopping the damage (scheduler/app/damage.py): errcodes that concern a whole template, page,
the app's credentials or a user are acted on once, on a real PostgreSQL and a fake WeChat."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from scheduler.app.lifecycle import Lifecycle
from scheduler.app.status import overview, plan_status, render_overview, render_plan
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.plan import Plan
from scheduler.testing.fake_wechat import FakeWeChat
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import T0, Clock, calendar_plan, dispatcher, enrol, register

FIRE = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
OCCURRENCE = FIRE.isoformat()


def variant(plan_id: str, template_id: str = "tmpl_alert", page: str | None = None) -> Plan:
    data = calendar_plan().model_dump(mode="json")
    data["id"], data["template"]["id"], data["template"]["page"] = plan_id, template_id, page
    return Plan.model_validate(data)


async def outcomes(store, plan_id: str) -> Counter:
    rows = await store.pool.fetch(
        "SELECT status, reason FROM deliveries WHERE plan_id = $1 AND occurrence = $2",
        plan_id,
        OCCURRENCE,
    )
    return Counter(f"{r['status']}:{r['reason']}" for r in rows)


async def state(store, plan_id: str) -> tuple[str, str | None]:
    row = await store.pool.fetchrow("SELECT state, state_reason FROM plans WHERE id = $1", plan_id)
    return row["state"], row["state_reason"]


def stops(scope: str, errcode: str) -> float:
    value = REGISTRY.get_sample_value(
        "reminders_damage_stops_total", {"scope": scope, "errcode": errcode}
    )
    return value or 0.0


async def test_a_banned_template_mid_fan_out_pauses_its_plans_and_sends_nothing_more(
    store, fake, channel
):
    users = [f"o-{i:04d}" for i in range(600)]
    alerts, sibling, other = variant("alerts"), variant("sibling"), variant("other", "tmpl_other")
    for plan in (alerts, sibling, other):
        await register(store, plan)
    await enrol(store, alerts, users)
    await enrol(store, other, users[:5])
    fake.ban_template("tmpl_alert", after_sends=150)
    before = stops("template", "43107")
    concurrency = 8
    d = dispatcher(
        store, channel, Clock(T0), concurrency=concurrency, batch_size=50, chunk_size=200
    )

    await d.fire(alerts.id, FIRE)

    # The sends on the wire when the first 43107 came back are all that met it after the first.
    banned = fake.stats()["errcodes"]["43107"]
    assert 1 <= banned <= concurrency
    counts = await outcomes(store, alerts.id)
    assert counts["sent:None"] == 150
    assert counts["failed:template_banned"] == banned
    assert counts["skipped:template_banned"] == 600 - 150 - banned  # recorded, not attempted
    assert sum(counts.values()) == 600  # one final outcome per user, nothing pending
    for plan_id in ("alerts", "sibling"):  # every plan on the template
        plan_state, reason = await state(store, plan_id)
        assert plan_state == "paused" and "43107" in reason and "tmpl_alert" in reason
    assert (await state(store, "other"))[0] == "active"
    assert (
        await store.pool.fetchval(
            "SELECT count(*) FROM plan_events WHERE action = 'pause' AND actor = 'daemon'"
        )
        == 2
    )
    assert (
        await store.pool.fetchval("SELECT count(*) FROM occurrences WHERE state = 'running'") == 0
    )
    assert stops("template", "43107") == before + 1
    report = await plan_status(store, alerts.id, now=T0)
    assert report is not None and "43107" in render_plan(report)

    # An admin fixes the template and resumes: the next occurrence goes out again.
    fake.ban_template("tmpl_alert", after_sends=10_000)
    next_day = datetime(2026, 3, 3, 1, 0, tzinfo=UTC)
    await Lifecycle(store, clock=Clock(T0)).resume(alerts.id, actor="admin", reason="fixed")
    report = await dispatcher(store, channel, Clock(next_day)).fire(alerts.id, next_day)
    assert report.sent == 600


@pytest.mark.parametrize(
    ("errcode", "reason", "scope", "paused"),
    [
        (40037, "bad_template", "template", {"alerts", "sibling"}),
        (40001, "token", "app", {"alerts", "sibling", "other"}),  # twice: after one refresh
    ],
)
async def test_an_errcode_met_mid_fan_out_pauses_what_it_concerns_and_sends_nothing_more(
    store, fake, channel, errcode, reason, scope, paused
):
    users = [f"o-{i:04d}" for i in range(200)]
    alerts, sibling, other = variant("alerts"), variant("sibling"), variant("other", "tmpl_other")
    for plan in (alerts, sibling, other):
        await register(store, plan)
    await enrol(store, alerts, users)
    fake.inject(times=60)  # 60 sends go through, then every send meets the errcode
    fake.inject(errcodes=[errcode], times=10_000)
    before = stops(scope, str(errcode))
    concurrency = 8

    await dispatcher(store, channel, Clock(T0), concurrency=concurrency, batch_size=25).fire(
        alerts.id, FIRE
    )

    met = fake.stats()["errcodes"][str(errcode)]
    attempts = 2 if errcode == 40001 else 1  # a token error is retried once with a new token
    assert 1 <= met <= concurrency * attempts  # only the sends already on the wire met it
    counts = await outcomes(store, alerts.id)
    failed = counts[f"failed:{reason}"]
    assert counts["sent:None"] == 60 and 1 <= failed <= concurrency
    assert counts[f"skipped:{reason}"] == 200 - 60 - failed  # recorded, not attempted
    for plan_id in ("alerts", "sibling", "other"):
        plan_state, why = await state(store, plan_id)
        if plan_id in paused:
            assert plan_state == "paused" and str(errcode) in why, (plan_id, why)
        else:
            assert plan_state == "active"
    assert await store.pool.fetchval(
        "SELECT count(*) FROM plan_events WHERE action = 'pause' AND actor = 'daemon'"
        " AND reason LIKE $1",
        f"%{errcode}%",
    ) == len(paused)
    assert stops(scope, str(errcode)) == before + 1
    assert f"WeChat errcode {errcode}" in render_overview(await overview(store, now=T0))
    if errcode == 40001:  # the first token, and one refresh for the whole app
        assert fake.stats()["token_calls"] == {"stable_token": 2}


async def test_an_invalid_page_pauses_the_plans_on_that_page_only(store, fake, channel):
    on_page = variant("on-page", page="pages/a?x=1")
    same_page = variant("same-page", "tmpl_other", page="pages/a?y=2")
    elsewhere = variant("elsewhere", "tmpl_third", page="pages/b")
    for plan in (on_page, same_page, elsewhere):
        await register(store, plan)
    await enrol(store, on_page, [f"o-{i}" for i in range(40)])
    fake.inject(errcodes=[41030], times=40)  # the page is not in the live version

    await dispatcher(store, channel, Clock(T0), concurrency=4, batch_size=10).fire(on_page.id, FIRE)

    assert fake.stats()["errcodes"]["41030"] <= 4
    assert (await state(store, "on-page"))[0] == "paused"
    assert (await state(store, "same-page"))[0] == "paused"
    assert (await state(store, "elsewhere"))[0] == "active"
    counts = await outcomes(store, on_page.id)
    assert counts["skipped:bad_page"] >= 36 and sum(counts.values()) == 40


async def test_refused_credentials_pause_every_plan_with_one_token_call(store):
    fake = FakeWeChat(appid="app", secret="the-real-one")
    await fake.start("127.0.0.1", 0)
    channel = WeChatChannel(fake.base_url, "app", "a-wrong-one", retries=2, backoff_base=0.01)
    try:
        alerts, other = variant("alerts"), variant("other", "tmpl_other")
        for plan in (alerts, other):
            await register(store, plan)
        await enrol(store, alerts, [f"o-{i:03d}" for i in range(300)])
        await dispatcher(store, channel, Clock(T0), concurrency=16, batch_size=50).fire(
            alerts.id, FIRE
        )
    finally:
        await channel.aclose()
        await fake.stop()

    assert sum(fake.stats()["token_calls"].values()) == 1  # counted per app, not per send
    assert fake.stats()["sends"] == 0
    for plan_id in ("alerts", "other"):
        plan_state, reason = await state(store, plan_id)
        assert plan_state == "paused" and "credentials" in reason
    counts = await outcomes(store, alerts.id)
    assert sum(counts.values()) == 300 and counts["sent:None"] == 0
    assert counts["failed:token"] + counts["skipped:token"] == 300


async def test_an_invalid_openid_stops_that_users_enrolments_and_nothing_else(store, fake, channel):
    alerts, other = variant("alerts"), variant("other", "tmpl_other")
    for plan in (alerts, other):
        await register(store, plan)
    await enrol(store, alerts, ["o-a-bad", "o-b", "o-c"])
    await enrol(store, other, ["o-a-bad", "o-b"])
    fake.inject(errcodes=[40003])  # users go in id order with one worker: o-a-bad first
    before = stops("user", "40003")

    report = await dispatcher(store, channel, Clock(T0), concurrency=1).fire(alerts.id, FIRE)

    assert report.sent == 2
    rows = await store.pool.fetch(
        "SELECT plan_id, user_id, status FROM enrollments ORDER BY plan_id, user_id"
    )
    assert {(r["plan_id"], r["user_id"]): r["status"] for r in rows} == {
        ("alerts", "o-a-bad"): "stopped",
        ("alerts", "o-b"): "active",
        ("alerts", "o-c"): "active",
        ("other", "o-a-bad"): "stopped",
        ("other", "o-b"): "active",
    }
    assert (
        await store.pool.fetchval(
            "SELECT count(*) FROM plan_events WHERE action = 'stop_enrollment' AND actor = 'daemon'"
            " AND reason LIKE '%40003%'"
        )
        == 2
    )
    assert (await state(store, "alerts"))[0] == "active"
    assert stops("user", "40003") == before + 1
