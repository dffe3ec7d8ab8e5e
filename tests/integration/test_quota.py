"""WeChat's daily quota read ahead (scheduler/app/quota.py): sends are held back before 45009,
high-priority plans go first, and the held sends go after the reset. Real PostgreSQL, the fake
WeChat's quota API on loopback, virtual time."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

from scheduler.domain.plan import Plan
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import T0, Clock, calendar_plan, dispatcher, enrol, register

FIRE = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 09:00 in China: the reset is 15 hours away


def plan_of(plan_id: str, priority: str) -> Plan:
    data = calendar_plan().model_dump(mode="json")
    data["id"], data["template"]["id"] = plan_id, f"tmpl_{plan_id}"
    data["delivery"] |= {"priority": priority, "max_delay": "24 hours"}
    return Plan.model_validate(data)


async def outcomes(store, plan_id: str) -> Counter:
    rows = await store.pool.fetch(
        "SELECT status, reason FROM deliveries WHERE plan_id = $1", plan_id
    )
    return Counter(f"{r['status']}:{r['reason']}" for r in rows)


async def test_a_short_quota_goes_to_high_priority_plans_first_and_never_meets_45009(
    store, fake, channel
):
    low, high = plan_of("digest", "low"), plan_of("pension", "high")
    for plan in (low, high):
        await register(store, plan)
    await enrol(store, low, [f"o-{i:03d}" for i in range(100)])
    await enrol(store, high, [f"o-{i:03d}" for i in range(40)])
    fake.daily_quota = 100
    clock = Clock(FIRE)
    d = dispatcher(store, channel, clock, concurrency=16, batch_size=25)

    await d.fire(low.id, FIRE)  # the low plan leaves 20 % of the quota to the others
    await d.fire(high.id, FIRE)  # the high one may use it up

    assert fake.stats()["errcodes"].get("45009", 0) == 0  # held back before WeChat refused
    assert (await outcomes(store, low.id)) == Counter({"sent:None": 80, "deferred:quota": 20})
    assert (await outcomes(store, high.id)) == Counter({"sent:None": 20, "deferred:quota": 20})
    reset = datetime(2026, 3, 2, 16, 0, tzinfo=UTC)  # midnight in China
    assert (
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE defer_until = $1", reset)
        == 40
    )
    detail = await store.pool.fetchval(
        "SELECT detail FROM deliveries WHERE plan_id = $1 AND status = 'deferred' LIMIT 1", low.id
    )
    assert "higher priority than low" in detail

    # A new day: WeChat's count starts again, the replica reads it again, and once the users'
    # quiet hours are over the held sends go.
    fake.quota_used = 0
    clock.now = datetime(2026, 3, 3, 0, 30, tzinfo=UTC)  # 08:30 in China
    for plan in (high, low):
        await d.retry_deferred(plan.id)
    assert (await outcomes(store, high.id)) == Counter({"sent:None": 40})
    assert (await outcomes(store, low.id)) == Counter({"sent:None": 100})


async def test_an_account_that_cannot_read_its_quota_still_stops_at_45009(store, fake, channel):
    plan = plan_of("digest", "normal")
    await register(store, plan)
    await enrol(store, plan, [f"o-{i:03d}" for i in range(30)])
    fake.daily_quota, fake.quota_readable = 10, False

    await dispatcher(store, channel, Clock(FIRE), concurrency=1).fire(plan.id, FIRE)

    assert fake.stats()["errcodes"]["45009"] == 1  # met once, then every send is held
    counts = await outcomes(store, plan.id)
    assert counts["sent:None"] == 10 and counts["deferred:quota"] == 20


async def test_a_normal_plan_leaves_its_reserve(store, fake, channel):
    plan = plan_of("digest", "normal")
    await register(store, plan)
    await enrol(store, plan, [f"o-{i:03d}" for i in range(50)])
    fake.daily_quota, fake.quota_used = 40, 0  # 5 % of 40 rounds up to 2 kept back

    await dispatcher(store, channel, Clock(T0 + timedelta(hours=1)), concurrency=8).fire(
        plan.id, FIRE
    )

    assert (await outcomes(store, plan.id)) == Counter({"sent:None": 38, "deferred:quota": 12})
