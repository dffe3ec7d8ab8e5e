"""Status reports and metrics agree with the ledger (virtual time, real PostgreSQL)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from scheduler.app import status
from scheduler.app.lifecycle import Lifecycle
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, audience, daily, dispatcher, register, weekly_relative


def sends_metric(plan: str, outcome: str, reason: str = "") -> float:
    value = REGISTRY.get_sample_value(
        "reminders_sends_total", {"plan": plan, "outcome": outcome, "reason": reason}
    )
    return value or 0.0


async def test_status_counts_match_the_ledger_by_window(store, fake, channel):
    plan = daily(consent="one_time")
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b", "o-c"], credits=3)
    await Lifecycle(store).opt_out("o-c", plan_id=plan.id, actor="t", reason="asked")
    before = {k: sends_metric(plan.id, *k) for k in [("sent",), ("skipped", "no_consent")]}
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock)
    for day in range(10):  # ten daily occurrences; credits run out after three
        clock.now = datetime(2026, 3, 2, 1, 0, tzinfo=UTC) + timedelta(days=day)
        await d.fire(plan.id, clock.now)
    fake.inject(errcodes=[40003])
    clock.now += timedelta(days=1)
    await store.record_consent("o-a", "tmpl", "one_time", "accept", "test")
    await d.fire(plan.id, clock.now)

    report = await status.plan_status(store, plan.id, now=clock.now + timedelta(minutes=1))
    rows = {(o["outcome"], o["reason"]): o for o in report["outcomes"]}
    ledger = {
        (r["status"], r["reason"]): r["n"]
        for r in await store.pool.fetch(
            "SELECT status, reason, count(*) AS n FROM deliveries GROUP BY 1, 2"
        )
    }
    assert {k: v["all"] for k, v in rows.items()} == ledger
    assert rows[("sent", None)]["all"] == 6
    assert rows[("skipped", "opted_out")] == {
        "outcome": "skipped",
        "reason": "opted_out",
        "24h": 1,
        "7d": 7,
        "all": 11,
    }
    assert rows[("failed", "bad_openid")]["24h"] == 1
    assert report["last_errors"][0]["errcode"] == 40003
    assert report["next_fires"][0]["local"] == "2026-03-13T09:00:00+08:00"
    assert report["remaining"] is None
    assert report["runway"] is None or "enrolled" in report["runway"]
    assert sends_metric(plan.id, "sent") - before[("sent",)] == 6
    assert (
        sends_metric(plan.id, "skipped", "no_consent") - before[("skipped", "no_consent")]
        == ledger[("skipped", "no_consent")]
    )
    assert sends_metric(plan.id, "skipped", "opted_out") >= 11

    text = status.render_plan(report, await status.replicas(store))
    assert "skipped (opted_out)" in text and "errcode 40003" in text
    overview = await status.overview(store, now=clock.now)
    assert overview["plans"][0]["outcomes"]["sent"]["all"] == 6
    # o-b spent its credits; o-a's enrolment stopped at 40003; o-c has credits (opted out).
    assert overview["plans"][0]["no_consent_next"] == 1
    assert [(e["plan_id"], e["errcode"]) for e in overview["last_errors"]] == [(plan.id, 40003)]
    text = status.render_overview(overview)
    assert "daily" in text and "Last errors:" in text and "bad_openid 40003" in text


async def test_status_of_a_relative_plan_and_a_paused_plan(store):
    plan = weekly_relative()
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b"])
    now = datetime(2026, 3, 3, tzinfo=UTC)
    await Lifecycle(store, clock=Clock(now)).pause(plan.id, actor="token:ops", reason="review")
    report = await status.plan_status(store, plan.id, now=now)
    assert report["state"] == "paused" and report["held"]
    assert report["state_changed"]["by"] == "token:ops"
    assert report["next_fires"] == [{"utc": "2026-03-09T01:00:00+00:00", "users": 2}]
    assert report["enrollments"] == {"active": 2}
    text = status.render_plan(report)
    assert "paused - review" in text and "held while paused" in text
    assert await status.plan_status(store, "nope", now=now) is None
