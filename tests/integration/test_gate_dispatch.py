"""The rules at send time, through the real dispatcher, PostgreSQL and a fake WeChat, in virtual
time: quiet hours in each user's own zone, deferral and its retry, caps across plans, content."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from scheduler.app.lifecycle import Lifecycle
from scheduler.domain.plan import Plan
from scheduler.domain.policy import Policy
from scheduler.store.consent import ConsentStore
from scheduler.store.postgres import Store
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, dispatcher, ledger, register

# 23:00 in Shanghai: inside the default quiet hours (22:00-08:00) there, 15:00 in London.
LATE = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)
NEXT_MORNING = datetime(2026, 3, 3, 0, 0, tzinfo=UTC)  # 08:00 in Shanghai


def notice_plan(plan_id: str = "notice", *, at: str = "23:00", **delivery) -> Plan:  # noqa: ANN003
    return Plan.model_validate(
        {
            "id": plan_id,
            "name": "Notice",
            "category": "government",
            "consent": "long_term",
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": at},
                    "start": "2026-03-01",
                }
            },
            "template": {"id": f"tmpl_{plan_id}", "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": "Notice {step}"}},
            "delivery": delivery,
        }
    )


async def enrol(store: Store, plan: Plan, user: str, tz: str = "Asia/Shanghai") -> None:
    await store.enroll(plan.id, user, LATE - timedelta(days=3), tz, {}, None)
    await store.record_consent(user, plan.template.id, "long_term", "accept", "test")


async def statuses(store: Store, plan_id: str) -> dict[str, tuple]:
    rows = await ledger(store, plan_id)
    return {r["user_id"]: (r["status"], r["reason"]) for r in rows}


async def test_quiet_hours_defer_to_the_users_own_morning_then_the_retry_sends(
    store, fake, channel
):
    plan = notice_plan()
    await register(store, plan)
    await enrol(store, plan, "o-shanghai")
    await enrol(store, plan, "o-london", "Europe/London")
    clock = Clock(LATE)
    d = dispatcher(store, channel, clock)

    report = await d.fire(plan.id, LATE)

    assert [m["touser"] for m in fake.messages] == ["o-london"]
    assert report.gate == {"deferred:quiet_hours": 1}
    assert await statuses(store, plan.id) == {
        "o-london": ("sent", None),
        "o-shanghai": ("deferred", "quiet_hours"),
    }
    held = await store.pool.fetchrow(
        "SELECT defer_until, detail FROM deliveries WHERE status = 'deferred'"
    )
    assert held["defer_until"] == NEXT_MORNING
    assert "22:00-08:00" in held["detail"]

    clock.now = NEXT_MORNING - timedelta(minutes=1)  # not yet
    assert (await d.retry_deferred(plan.id)).sent == 0
    clock.now = NEXT_MORNING
    assert (await d.retry_deferred(plan.id)).sent == 1

    assert [m["touser"] for m in fake.messages] == ["o-london", "o-shanghai"]
    assert fake.messages[1]["data"] == {"thing1": "Notice 2"}  # rendered when it was due
    assert (await statuses(store, plan.id))["o-shanghai"] == ("sent", None)


async def test_quiet_hours_skip_when_the_plan_says_so(store, fake, channel):
    plan = notice_plan(on_quiet_hours="skip")
    await register(store, plan)
    await enrol(store, plan, "o-a")

    await dispatcher(store, channel, Clock(LATE)).fire(plan.id, LATE)

    assert fake.messages == []
    assert await statuses(store, plan.id) == {"o-a": ("skipped", "quiet_hours")}


async def test_the_daily_cap_counts_across_plans(store, fake, channel):
    morning = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    plans = [notice_plan(f"p{n}", at="10:00") for n in range(3)]
    for plan in plans:
        await register(store, plan)
        await enrol(store, plan, "o-a")
    d = dispatcher(store, channel, Clock(morning))

    for plan in plans:
        await d.fire(plan.id, morning)

    assert len(fake.messages) == 2  # the default: 2 per user per local day, all plans together
    assert await statuses(store, "p2") == {"o-a": ("skipped", "capped")}


async def test_a_capped_send_deferred_waits_for_the_next_day_and_its_quiet_hours(
    store, fake, channel
):
    evening = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)  # 20:00 in Shanghai
    plans = [notice_plan(f"p{n}", at="20:00", on_capped="defer") for n in range(3)]
    for plan in plans:
        await register(store, plan)
        await enrol(store, plan, "o-a")
    clock = Clock(evening)
    d = dispatcher(store, channel, clock)
    for plan in plans:
        await d.fire(plan.id, evening)
    assert len(fake.messages) == 2
    midnight = datetime(2026, 3, 2, 16, 0, tzinfo=UTC)
    assert (
        await store.pool.fetchval("SELECT defer_until FROM deliveries WHERE status = 'deferred'")
        == midnight
    )

    clock.now = midnight  # the cap has room again, but it is the middle of the night
    await d.retry_deferred("p2")
    assert len(fake.messages) == 2
    row = await store.pool.fetchrow(
        "SELECT reason, defer_until FROM deliveries WHERE status = 'deferred'"
    )
    assert (row["reason"], row["defer_until"]) == ("quiet_hours", NEXT_MORNING)

    clock.now = NEXT_MORNING
    await d.retry_deferred("p2")
    assert len(fake.messages) == 3
    assert await statuses(store, "p2") == {"o-a": ("sent", None)}


async def test_a_deferral_that_outlives_max_delay_is_skipped_and_cancel_ends_the_rest(
    store, fake, channel
):
    plan = notice_plan(max_delay="2 hours")
    await register(store, plan)
    await enrol(store, plan, "o-a")
    clock = Clock(LATE)
    d = dispatcher(store, channel, clock)

    await d.fire(plan.id, LATE)
    # 08:00 is 9 hours away, beyond max_delay: skipped at once, with the reason.
    assert await statuses(store, plan.id) == {"o-a": ("skipped", "quiet_hours")}
    detail = await store.pool.fetchval("SELECT detail FROM deliveries")
    assert "max_delay" in detail

    patient = notice_plan("patient", max_delay="12 hours")
    await register(store, patient)
    await enrol(store, patient, "o-b")
    await d.fire(patient.id, LATE)
    assert await statuses(store, patient.id) == {"o-b": ("deferred", "quiet_hours")}
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.cancel(patient.id, actor="test", reason="wrong text")
    assert await statuses(store, patient.id) == {"o-b": ("skipped", "cancelled")}
    assert fake.messages == []


async def test_content_rules_stop_a_rendered_message_with_the_rule_and_detail(store, fake, channel):
    plan = Plan.model_validate(
        {
            **notice_plan(at="10:00").model_dump(mode="json"),
            "message": {"default": {"thing1": "{offer}"}},
            "variables": ["offer"],
        }
    )
    await register(store, plan)
    morning = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    await store.enroll(plan.id, "o-promo", morning, "Asia/Shanghai", {"offer": "限时优惠"}, None)
    await store.enroll(plan.id, "o-plain", morning, "Asia/Shanghai", {"offer": "社保到账"}, None)
    for user in ("o-promo", "o-plain"):
        await store.record_consent(user, plan.template.id, "long_term", "accept", "test")

    await dispatcher(store, channel, Clock(morning)).fire(plan.id, morning)

    assert [m["touser"] for m in fake.messages] == ["o-plain"]
    row = await store.pool.fetchrow(
        "SELECT status, reason, detail FROM deliveries WHERE user_id = 'o-promo'"
    )
    assert (row["status"], row["reason"]) == ("skipped", "content")
    assert "优惠" in row["detail"]


async def test_two_deferred_sends_of_one_user_share_a_cap_with_room_for_one(store, fake, channel):
    """Both of a day's late messages wait for the morning; with room for one, one goes."""
    plan = Plan.model_validate(
        {
            **notice_plan().model_dump(mode="json"),
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": ["22:30", "23:00"]},
                    "start": "2026-03-01",
                }
            },
        }
    )
    await register(store, plan)
    await enrol(store, plan, "o-a")
    policy = Policy.model_validate({"caps": {"user_day": 1}})
    clock = Clock(LATE - timedelta(minutes=30))
    d = dispatcher(store, channel, clock, policy=policy)
    await d.fire(plan.id, clock.now)
    clock.now = LATE
    await d.fire(plan.id, LATE)

    clock.now = NEXT_MORNING
    await d.retry_deferred(plan.id)

    assert len(fake.messages) == 1
    rows = await store.pool.fetch("SELECT status, reason FROM deliveries ORDER BY due_at")
    assert [(r["status"], r["reason"]) for r in rows] == [("sent", None), ("skipped", "capped")]


async def test_a_spent_daily_quota_holds_every_send_until_midnight_china_time(store, fake, channel):
    """45009: stop sending for the day and put the sends back for after midnight (CST); a
    one-time credit taken by a send put back is returned, and taken again when it goes."""
    plan = Plan.model_validate(
        {
            **notice_plan(at="10:00", max_delay="1 day").model_dump(mode="json"),
            "consent": "one_time",
        }
    )
    await register(store, plan)
    users = [f"o-{i}" for i in range(5)]
    for user in users:
        await store.enroll(plan.id, user, LATE - timedelta(days=3), "Asia/Shanghai", {}, None)
        await store.record_consent(user, plan.template.id, "one_time", "accept", "test")
    morning = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    clock = Clock(morning)
    d = dispatcher(store, channel, clock, batch_size=2, concurrency=1)
    fake.inject(errcodes=[45009], times=1)

    report = await d.fire(plan.id, morning)

    assert fake.messages == [] and report.gate == {"deferred:quota": 5}
    midnight = datetime(2026, 3, 2, 16, 0, tzinfo=UTC)
    rows = await store.pool.fetch("SELECT status, reason, defer_until FROM deliveries")
    assert {(r["status"], r["reason"], r["defer_until"]) for r in rows} == {
        ("deferred", "quota", midnight)
    }
    # Only the send WeChat answered carries its errcode; the others were never tried.
    assert await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE errcode = 45009") == 1
    credits = await store.pool.fetch("SELECT credits FROM consent")
    assert [r["credits"] for r in credits] == [1] * 5  # the put-back send's credit came back

    clock.now = NEXT_MORNING  # 08:00 in Shanghai: past the reset and the quiet hours
    await d.retry_deferred(plan.id)

    assert sorted(m["touser"] for m in fake.messages) == users
    assert await store.pool.fetchval("SELECT sum(credits) FROM consent") == 0
    assert await ConsentStore(store.pool).mismatches() == {}  # the history explains the credits


async def test_a_quota_reset_past_max_delay_is_a_skip_not_a_silent_drop(store, fake, channel):
    plan = notice_plan(at="10:00")  # max_delay 12 hours; the reset is 14 hours away
    await register(store, plan)
    for user in ("o-a", "o-b"):
        await enrol(store, plan, user)
    morning = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    fake.inject(errcodes=[45009], times=1)

    await dispatcher(store, channel, Clock(morning), concurrency=1).fire(plan.id, morning)

    assert await statuses(store, plan.id) == {
        "o-a": ("skipped", "quota"),
        "o-b": ("skipped", "quota"),
    }
