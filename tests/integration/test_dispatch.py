"""The send pipeline on a real PostgreSQL and a fake WeChat on loopback, in virtual time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from scheduler.app.dispatcher import FanOutReport
from scheduler.app.lifecycle import Lifecycle
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.schedule import relative_due
from scheduler.store.postgres import ClaimBatch, Due
from scheduler.testing.fake_wechat import FakeWeChat
from tests.support import T0, Clock, calendar_plan, dispatcher, ledger, register, weekly_relative


@pytest.fixture
async def fake() -> AsyncIterator[FakeWeChat]:
    fake = FakeWeChat()
    await fake.start("127.0.0.1", 0)
    yield fake
    await fake.stop()


@pytest.fixture
async def channel(fake: FakeWeChat) -> AsyncIterator[WeChatChannel]:
    channel = WeChatChannel(
        base_url=fake.base_url,
        appid="app",
        secret="secret",
        retries=2,
        backoff_base=0.01,
        backoff_max=0.02,
    )
    yield channel
    await channel.aclose()


async def test_fan_out_sends_once_per_user_and_records_every_outcome(store, fake, channel):
    plan = calendar_plan()
    await register(store, plan)
    users = [f"o-user-{i:03d}" for i in range(25)]
    for user in users:
        await store.enroll(plan.id, user, T0, "Asia/Shanghai", {"who": user}, None)
    for user in users[:20]:  # five users never accepted
        await store.record_consent(user, "tmpl_alert", "long_term", "accept", "test")
    d = dispatcher(store, channel, Clock(T0), batch_size=7, concurrency=4)

    fire = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    report = await d.fire(plan.id, fire)
    again = await d.fire(plan.id, fire)  # a double fire of the same occurrence

    assert (report.sent, report.no_consent) == (20, 5)
    # The double fire meets the occurrence already done: no chunk left, nothing claimed.
    assert again.sent == 0 and again.claimed == 0
    assert sorted(m["touser"] for m in fake.messages) == users[:20]
    sent = fake.messages[0]
    # step 2: the plan started on Mar 1
    assert sent["data"] == {"thing1": f"Alert for {sent['touser']}", "number2": "2"}
    rows = await ledger(store, plan.id)
    assert len(rows) == 25
    assert {(r["status"], r["reason"]) for r in rows if r["user_id"] in users[20:]} == {
        ("skipped", "no_consent")
    }
    assert all(r["status"] == "sent" and r["msgid"] for r in rows if r["user_id"] in users[:20])


async def test_one_time_credits_are_consumed_once_per_send(store, fake, channel):
    plan = calendar_plan(consent="one_time")
    await register(store, plan)
    await store.enroll(plan.id, "o-a", T0, "Asia/Shanghai", {"who": "a"}, None)
    await store.enroll(plan.id, "o-b", T0, "Asia/Shanghai", {"who": "b"}, None)
    for _ in range(2):
        await store.record_consent("o-a", "tmpl_alert", "one_time", "accept", "test")
    await store.record_consent("o-b", "tmpl_alert", "one_time", "accept", "test")
    d = dispatcher(store, channel, Clock(T0))

    day = timedelta(days=1)
    first = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    await d.fire(plan.id, first)
    await d.fire(plan.id, first)  # double fire: no second credit taken
    assert (await store.consent_of("o-a", "tmpl_alert"))["credits"] == 1
    assert (await store.consent_of("o-b", "tmpl_alert"))["credits"] == 0
    await d.fire(plan.id, first + day)
    await d.fire(plan.id, first + 2 * day)

    outcomes = {
        (r["user_id"], r["step"]): (r["status"], r["reason"]) for r in await ledger(store, plan.id)
    }
    assert outcomes == {
        ("o-a", 2): ("sent", None),
        ("o-a", 3): ("sent", None),
        ("o-a", 4): ("skipped", "no_consent"),
        ("o-b", 2): ("sent", None),
        ("o-b", 3): ("skipped", "no_consent"),
        ("o-b", 4): ("skipped", "no_consent"),
    }
    assert len(fake.messages) == 3


async def test_43101_clears_consent_and_transient_failure_refunds_the_credit(store, fake, channel):
    plan = calendar_plan(consent="one_time")
    await register(store, plan)
    for user in ("o-gone", "o-busy"):
        await store.enroll(plan.id, user, T0, "Asia/Shanghai", {"who": user}, None)
        for _ in range(3):
            await store.record_consent(user, "tmpl_alert", "one_time", "accept", "test")
    # Users are sent in user-id order with one worker: o-busy first, then o-gone.
    fake.inject(errcodes=[-1, -1, 43101])  # o-busy: -1 twice (retries exhausted); o-gone: 43101
    d = dispatcher(store, channel, Clock(T0), concurrency=1)

    await d.fire(plan.id, datetime(2026, 3, 2, 1, 0, tzinfo=UTC))

    rows = {r["user_id"]: r for r in await ledger(store, plan.id)}
    assert (rows["o-gone"]["status"], rows["o-gone"]["reason"], rows["o-gone"]["errcode"]) == (
        "failed",
        "consent_gone",
        43101,
    )
    assert (rows["o-busy"]["status"], rows["o-busy"]["reason"]) == ("failed", "transient")
    assert (await store.consent_of("o-gone", "tmpl_alert"))["credits"] == 0
    assert (await store.consent_of("o-busy", "tmpl_alert"))["credits"] == 3  # given back


async def test_paused_plan_sends_nothing(store, fake, channel):
    plan = calendar_plan()
    await register(store, plan)
    await store.enroll(plan.id, "o-a", T0, "Asia/Shanghai", {"who": "a"}, None)
    await store.record_consent("o-a", "tmpl_alert", "long_term", "accept", "test")
    await Lifecycle(store).pause(plan.id, actor="admin", reason="testing")

    report = await dispatcher(store, channel, Clock(T0)).fire(
        plan.id, datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    )

    assert report.stopped and fake.messages == [] and await ledger(store, plan.id) == []


async def test_relative_plan_sweeps_each_users_due_steps_in_virtual_time(store, fake, channel):
    plan = weekly_relative()
    await register(store, plan)
    tz = ZoneInfo("Asia/Shanghai")
    starts = {"o-early": T0, "o-late": T0 + timedelta(days=2)}
    for user, start in starts.items():
        await store.enroll(
            plan.id, user, start, tz.key, {}, relative_due(plan.schedule.relative, start, tz, 0)
        )
        for _ in range(3):
            await store.record_consent(user, "tmpl_rehab", "one_time", "accept", "test")
    clock = Clock(T0)
    d = dispatcher(store, channel, clock)

    # Week 1 of o-early is due at T0 + 7 days (09:00 local); o-late's two days later.
    clock.now = T0 + timedelta(days=7, minutes=1)
    await d.fire(plan.id, clock.now)
    assert [m["touser"] for m in fake.messages] == ["o-early"]
    clock.now = T0 + timedelta(days=9, minutes=1)
    await d.fire(plan.id, clock.now)
    await d.fire(plan.id, clock.now)  # nothing more is due
    assert [m["touser"] for m in fake.messages] == ["o-early", "o-late"]
    # The daemon was down for a day: o-early's week 2 is past its 2-hour grace -> missed.
    clock.now = T0 + timedelta(days=15)
    await d.fire(plan.id, clock.now)
    clock.now = T0 + timedelta(days=21, minutes=1)
    await d.fire(plan.id, clock.now)

    outcomes = {
        (r["user_id"], r["step"]): (r["status"], r["reason"]) for r in await ledger(store, plan.id)
    }
    assert outcomes == {
        ("o-early", 1): ("sent", None),
        ("o-early", 2): ("missed", "grace_exceeded"),
        ("o-early", 3): ("sent", None),
        ("o-late", 1): ("sent", None),
        ("o-late", 2): ("missed", "grace_exceeded"),  # due on day 16, the sweep came on day 21
    }
    assert fake.messages[-1]["data"] == {"thing1": "Week 3 仅供参考"}
    enrolment = await store.pool.fetchrow(
        "SELECT status, next_step, next_due_at FROM enrollments WHERE user_id = 'o-early'"
    )
    assert dict(enrolment) == {"status": "finished", "next_step": 3, "next_due_at": None}


async def test_a_dead_replicas_sends_in_flight_become_unknown_and_the_rest_is_sent(
    store, fake, channel
):
    plan = calendar_plan()
    await register(store, plan)
    for user in ("o-a", "o-b"):
        await store.enroll(plan.id, user, T0, "Asia/Shanghai", {"who": user}, None)
        await store.record_consent(user, "tmpl_alert", "long_term", "accept", "test")
    fire = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
    # A replica claimed both rows, handed o-a's to the channel (recorded in flight), and died.
    batch = ClaimBatch(plan.id, 1, "tmpl_alert", "long_term", "dead-one")
    message = {"thing1": "x", "number2": "2"}
    claims = await store.claim(
        store.pool, batch, [Due(fire.isoformat(), u, 2, fire, message) for u in ("o-a", "o-b")]
    )
    ids = {c.user_id: c.delivery_id for c in claims}
    assert await store.fanout.record_flight("dead-one", [], [ids["o-a"]], []) == (
        {ids["o-a"]},
        set(),
    )
    assert await store.fanout.recover_dead(60) == []  # alive: its lease has not run out
    await store.pool.execute("UPDATE replicas SET last_seen = now() - interval '5 minutes'")

    [recovered] = await store.fanout.recover_dead(60)
    assert (recovered.unknown, recovered.released) == (1, 1)
    # The dead replica, had it only been slow, may no longer send what was given back.
    assert await store.fanout.record_flight("dead-one", [], [ids["o-b"]], []) == (set(), set())
    survivor = dispatcher(store, channel, Clock(T0))
    report = FanOutReport()
    await survivor.work_released(report)
    again = await survivor.fire(plan.id, fire)

    assert report.sent == 1 and again.sent == 0
    assert [m["touser"] for m in fake.messages] == ["o-b"]
    rows = {r["user_id"]: (r["status"], r["reason"]) for r in await ledger(store, plan.id)}
    assert rows == {"o-a": ("unknown", "crashed_in_flight"), "o-b": ("sent", None)}
