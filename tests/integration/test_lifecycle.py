"""Plan lifecycle on a real PostgreSQL and a fake WeChat on loopback, in virtual time: pause
(mid-fan-out), resume with skip or catch-up, cancel, completion, opt-outs, stopping an enrolment,
refusals that change nothing, and two admins at once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.app.lifecycle import Lifecycle, LifecycleError, process_catch_up
from tests.ops_helpers import channel_fixture, eventually, fake_fixture  # noqa: F401 - fixtures
from tests.support import USERS, Clock, audience, daily, dispatcher, register, weekly_relative

# Tuesday 2026-03-03 08:00 in Shanghai; the plan fires daily at 09:00 local (01:00 UTC).
PAUSED_AT = datetime(2026, 3, 3, 0, 0, tzinfo=UTC)
RESUMED_AT = datetime(2026, 3, 5, 2, 0, tzinfo=UTC)  # an hour after the 5th's occurrence


async def outcomes(store, plan_id: str) -> dict[tuple[str, str, str | None], int]:
    rows = await store.pool.fetch(
        "SELECT occurrence, status, reason, count(*) AS n FROM deliveries WHERE plan_id = $1"
        " GROUP BY 1, 2, 3",
        plan_id,
    )
    return {(r["occurrence"], r["status"], r["reason"]): r["n"] for r in rows}


def occ(day: int) -> str:
    return datetime(2026, 3, day, 1, 0, tzinfo=UTC).isoformat()


async def events(store) -> int:
    return await store.pool.fetchval("SELECT count(*) FROM plan_events")


async def test_pause_stops_a_fan_out_within_one_batch(store, fake, channel):
    plan = daily()
    await register(store, plan)
    users = [f"o-{i:03d}" for i in range(40)]
    await audience(store, plan, users)
    fake.inject(latency_s=0.05, times=len(users))  # each send takes a while
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock, batch_size=5, concurrency=2)
    active = await d.load(plan.id)
    fan_out = asyncio.create_task(d.fan_out(active, clock.now))

    async def started() -> bool:
        return await store.pool.fetchval("SELECT count(*) FROM deliveries") >= 5

    await eventually(started, what="the fan-out under way")
    await Lifecycle(store, clock=clock).pause(plan.id, actor="test", reason="bad content")
    claimed_at_pause = await store.pool.fetchval("SELECT count(*) FROM deliveries")
    report = await asyncio.wait_for(fan_out, 10)

    claimed = await store.pool.fetchval("SELECT count(*) FROM deliveries")
    assert report.stopped
    # Batches already claimed finish (their sends are under way); no batch starts after the pause.
    assert claimed <= claimed_at_pause + 5 < len(users)
    assert len(fake.messages) == claimed
    pending = await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status='pending'")
    assert pending == 0


async def test_resume_with_skip_records_what_the_pause_held_back(store, fake, channel):
    plan = daily()
    await register(store, plan)
    await audience(store, plan)
    clock = Clock(PAUSED_AT)
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.pause(plan.id, actor="token:ops", reason="complaints")
    d = dispatcher(store, channel, clock)
    for day in (3, 4, 5):  # the schedule keeps firing; the fires do nothing while paused
        clock.now = datetime(2026, 3, day, 1, 0, tzinfo=UTC)
        assert (await d.fire(plan.id, clock.now)).stopped

    clock.now = RESUMED_AT
    result = await lifecycle.resume(plan.id, actor="token:ops")

    assert result.state == "active" and result.details["mode"] == "skip"
    assert result.details["skipped"] == [occ(3), occ(4), occ(5)]
    assert await outcomes(store, plan.id) == {
        (occ(day), "skipped", "paused"): len(USERS) for day in (3, 4, 5)
    }
    assert fake.messages == []
    # The next occurrence goes out as usual.
    clock.now = datetime(2026, 3, 6, 1, 0, tzinfo=UTC)
    assert (await d.fire(plan.id, clock.now)).sent == len(USERS)
    [event] = await lifecycle.audit(plan_id=plan.id, limit=1)
    assert (event["action"], event["actor"], event["version"]) == ("resume", "token:ops", 1)


async def test_resume_with_catch_up_sends_within_grace_and_records_the_rest_missed(
    store, fake, channel
):
    plan = daily(grace="30 hours")
    await register(store, plan)
    await audience(store, plan)
    clock = Clock(PAUSED_AT)
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.pause(plan.id, actor="test", reason="maintenance")
    clock.now = RESUMED_AT

    result = await lifecycle.resume(plan.id, actor="test", catch_up=True)

    # Mar 3 is 49 h late: missed. Mar 4 (25 h) and Mar 5 (1 h) are within the 30 h grace.
    assert result.details["missed"] == [occ(3)]
    assert result.details["caught_up"] == [occ(4), occ(5)]
    handled = await process_catch_up(store, dispatcher(store, channel, clock), clock=clock)
    assert handled == 2
    assert await outcomes(store, plan.id) == {
        (occ(3), "missed", "grace_exceeded"): len(USERS),
        (occ(4), "sent", None): len(USERS),
        (occ(5), "sent", None): len(USERS),
    }
    assert len(fake.messages) == 2 * len(USERS)
    assert await store.pool.fetchval("SELECT count(*) FROM catch_up") == 0


async def test_a_catch_up_whose_grace_runs_out_before_a_replica_takes_it_is_missed(
    store, fake, channel
):
    plan = daily(grace="2 hours")
    await register(store, plan)
    await audience(store, plan)
    clock = Clock(PAUSED_AT)
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.pause(plan.id, actor="test", reason="x")
    clock.now = RESUMED_AT
    result = await lifecycle.resume(plan.id, actor="test", catch_up=True)
    assert result.details["caught_up"] == [occ(5)]
    clock.now += timedelta(hours=3)  # no replica was running meanwhile
    await process_catch_up(store, dispatcher(store, channel, clock), clock=clock)
    assert (await outcomes(store, plan.id))[(occ(5), "missed", "grace_exceeded")] == len(USERS)
    assert fake.messages == []


@pytest.mark.parametrize("act", ["cancel", "pause-and-resume"])
async def test_acting_on_a_plan_while_its_catch_up_fans_out_does_not_wedge(
    store, fake, channel, act
):
    """The catch-up of a resume is fanned out while a cancel, or a pause and a resume with skip,
    come in (issue 9: concurrent admin calls stalled the daemon and its API). The catch-up kept
    its row locked in a transaction across the fan-out, whose next batch waits for the plan row
    the admin action holds while that action waits for the catch-up row: nobody moved again,
    and every later call on the plan took one more pooled connection until none was left."""
    plan = daily(grace="30 hours")
    await register(store, plan)
    users = [f"o-{i:03d}" for i in range(40)]
    await audience(store, plan, users)
    clock = Clock(PAUSED_AT)
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.pause(plan.id, actor="test", reason="maintenance")
    clock.now = RESUMED_AT
    result = await lifecycle.resume(plan.id, actor="test", catch_up=True)
    assert result.details["caught_up"] == [occ(4), occ(5)]
    fake.inject(latency_s=0.1, times=10 * len(users))  # each send takes a while
    d = dispatcher(store, channel, clock, batch_size=5, concurrency=2)

    async def sent_at(occurrence: str) -> int:
        return await store.pool.fetchval(
            "SELECT count(*) FROM deliveries WHERE occurrence = $1 AND status = 'sent'",
            occurrence,
        )

    catching_up = asyncio.create_task(process_catch_up(store, d, clock=clock))
    try:

        async def started() -> bool:
            return await sent_at(occ(4)) >= 5

        await eventually(started, what="the catch-up under way")
        if act == "cancel":
            await asyncio.wait_for(lifecycle.cancel(plan.id, actor="test", reason="x"), 5)
            state = "cancelled"
        else:
            await asyncio.wait_for(lifecycle.pause(plan.id, actor="test", reason="x"), 5)
            await asyncio.wait_for(lifecycle.resume(plan.id, actor="test"), 5)
            state = "active"
        await asyncio.wait_for(catching_up, 10)
    finally:
        catching_up.cancel()
    assert await store.pool.fetchval("SELECT state FROM plans WHERE id = $1", plan.id) == state
    # The admin action settled the queued catch-ups; the fan-out stopped within a batch.
    assert await store.pool.fetchval("SELECT count(*) FROM catch_up") == 0
    assert 5 <= await sent_at(occ(4)) < len(users)
    assert await sent_at(occ(5)) == 0
    assert (
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'pending'") == 0
    )


async def test_resume_of_a_relative_plan_skip_advances_and_catch_up_sends(store, fake, channel):
    plan = weekly_relative()
    await register(store, plan)
    await audience(store, plan, ["o-skip"])
    first_due = datetime(2026, 3, 9, 1, 0, tzinfo=UTC)  # a week after the start, 09:00 local
    clock = Clock(datetime(2026, 3, 8, tzinfo=UTC))
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.pause(plan.id, actor="test", reason="x")
    clock.now = first_due + timedelta(hours=1)
    d = dispatcher(store, channel, clock)
    assert (await d.fire(plan.id, clock.now)).stopped  # the sweep does nothing while paused
    row = await store.pool.fetchrow("SELECT next_step, next_due_at FROM enrollments")
    assert (row["next_step"], row["next_due_at"]) == (0, first_due)  # progress kept

    result = await lifecycle.resume(plan.id, actor="test")  # skip
    assert result.details["skipped_steps"] == 1
    row = await store.pool.fetchrow("SELECT next_step, next_due_at FROM enrollments")
    assert (row["next_step"], row["next_due_at"]) == (1, first_due + timedelta(weeks=1))
    await d.fire(plan.id, clock.now)
    assert fake.messages == []
    assert await outcomes(store, plan.id) == {("step-1", "skipped", "paused"): 1}

    # Catch-up: the overdue step is sent by the next sweep, within grace.
    await lifecycle.pause(plan.id, actor="test", reason="again")
    clock.now = first_due + timedelta(weeks=1, hours=1)
    await lifecycle.resume(plan.id, actor="test", catch_up=True)
    report = await d.fire(plan.id, clock.now)
    assert report.sent == 1
    assert fake.messages[0]["data"]["thing1"] == "Week 2 仅供参考"


async def test_cancel_is_final_and_keeps_history(store, fake, channel):
    plan = daily()
    await register(store, plan)
    await audience(store, plan)
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock)
    await d.fire(plan.id, clock.now)
    lifecycle = Lifecycle(store, clock=clock)
    result = await lifecycle.cancel(plan.id, actor="token:ops", reason="programme ended")
    assert (result.previous_state, result.state) == ("active", "cancelled")

    clock.now += timedelta(days=1)
    assert (await d.fire(plan.id, clock.now)).stopped
    assert len(fake.messages) == len(USERS)  # nothing more
    assert await store.pool.fetchval("SELECT count(*) FROM deliveries") == len(USERS)
    before = await events(store)
    for action in (lifecycle.pause, lifecycle.cancel):
        with pytest.raises(LifecycleError, match="cancelled") as err:
            await action(plan.id, actor="x", reason="y")
        assert err.value.code == "invalid_transition"
    with pytest.raises(LifecycleError, match="cancelled"):
        await lifecycle.resume(plan.id, actor="x")
    assert await events(store) == before


async def test_bad_requests_get_a_clear_message_and_change_nothing(store):
    plan = daily()
    await register(store, plan)
    lifecycle = Lifecycle(store)
    before = await events(store)
    cases = [
        (lifecycle.pause("nope", actor="a", reason="r"), "unknown_plan", "no plan 'nope'"),
        (lifecycle.resume(plan.id, actor="a"), "invalid_transition", "not paused"),
        (lifecycle.pause(plan.id, actor="a", reason="  "), "reason_required", "needs a reason"),
        (lifecycle.cancel(plan.id, actor="a", reason=None), "reason_required", "needs a reason"),
        (lifecycle.opt_in("o-x", plan_id=plan.id, actor="a"), "not_opted_out", "is not opted"),
        (
            lifecycle.stop_enrollment(plan.id, "o-x", actor="a", reason="r"),
            "unknown_enrollment",
            "not enrolled",
        ),
    ]
    for coro, code, text in cases:
        with pytest.raises(LifecycleError, match=text) as err:
            await coro
        assert err.value.code == code
    await lifecycle.pause(plan.id, actor="a", reason="r")
    with pytest.raises(LifecycleError, match="already paused \\(r\\)"):
        await lifecycle.pause(plan.id, actor="b", reason="again")
    assert await events(store) == before + 1
    assert (await store.plan(plan.id)).state == "paused"


async def test_an_action_waiting_for_a_plan_file_load_sees_the_plan_it_loaded(store):
    """A pause that waits for the plan row while a new version of the plan is being loaded acts
    on that version (issue 9, concurrent admin calls and reloads): it answered 404 unknown_plan,
    because the row it waited for, re-checked after the lock, pointed at a version its single
    statement's snapshot had not seen."""
    plan = daily()
    await register(store, plan)
    async with store.pool.acquire() as loading, loading.transaction():
        # What a plan-file load does to the plan row, held open while the pause comes in.
        await loading.execute("SELECT 1 FROM plans WHERE id = $1 FOR UPDATE", plan.id)
        await loading.execute(
            "INSERT INTO plan_versions (plan_id, version, content_hash, source_file, definition)"
            " SELECT plan_id, 2, 'edited', source_file, definition FROM plan_versions"
            " WHERE plan_id = $1 AND version = 1",
            plan.id,
        )
        await loading.execute("UPDATE plans SET current_version = 2 WHERE id = $1", plan.id)
        pausing = asyncio.create_task(Lifecycle(store).pause(plan.id, actor="a", reason="r"))

        async def waiting() -> bool:
            return bool(
                await store.pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
            )

        await eventually(waiting, 5, "the pause waiting for the plan row")
    result = await asyncio.wait_for(pausing, 5)
    assert (result.state, result.version) == ("paused", 2)


async def test_two_admins_at_once_serialise_on_the_plan_row(store):
    plan = daily()
    await register(store, plan)
    lifecycle = Lifecycle(store)
    results = await asyncio.gather(
        *(lifecycle.pause(plan.id, actor=f"admin-{i}", reason="r") for i in range(5)),
        return_exceptions=True,
    )
    ok = [r for r in results if not isinstance(r, Exception)]
    refused = [r for r in results if isinstance(r, LifecycleError)]
    assert len(ok) == 1 and len(refused) == 4
    # A resume and a cancel racing: both may succeed in some order, never a mixed state.
    results = await asyncio.gather(
        lifecycle.resume(plan.id, actor="a"),
        lifecycle.cancel(plan.id, actor="b", reason="r"),
        return_exceptions=True,
    )
    state = (await store.plan(plan.id)).state
    trail = [e["action"] for e in reversed(await lifecycle.audit(plan_id=plan.id))]
    assert state == "cancelled"
    assert trail[-1] == "cancel" and trail[:2] == ["loaded", "pause"]
    assert len(trail) == 2 + sum(not isinstance(r, Exception) for r in results)


async def test_the_last_occurrence_completes_a_plan_with_an_end_date(store, fake, channel):
    plan = daily(end="2026-03-03")
    await register(store, plan)
    await audience(store, plan)
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock)
    await d.fire(plan.id, clock.now)
    assert (await store.plan(plan.id)).state == "active"
    clock.now = datetime(2026, 3, 3, 1, 0, tzinfo=UTC)
    await d.fire(plan.id, clock.now)
    assert (await store.plan(plan.id)).state == "completed"


async def test_a_plan_cancelled_while_its_last_send_is_in_flight_stays_cancelled(
    store, fake, channel
):
    """The fan-out of the last occurrence completes the plan when it ends, through the lifecycle:
    a cancel that came in meanwhile is not overwritten."""
    plan = daily(end="2026-03-02")  # a single occurrence
    await register(store, plan)
    await audience(store, plan, ["o-last"])
    fake.inject(latency_s=1.0, times=1)
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock)
    last = asyncio.create_task(d.fire(plan.id, clock.now))

    async def in_flight() -> bool:
        return bool(await store.pool.fetchval("SELECT count(*) FROM deliveries"))

    await eventually(in_flight, what="the last send in flight")
    lifecycle = Lifecycle(store, clock=clock)
    await lifecycle.cancel(plan.id, actor="test", reason="withdrawn")
    await asyncio.wait_for(last, 10)

    assert (await store.plan(plan.id)).state == "cancelled"
    assert await outcomes(store, plan.id) == {(occ(2), "sent", None): 1}
    trail = [e["action"] for e in await lifecycle.audit(plan_id=plan.id)]
    assert "cancel" in trail and "complete" not in trail


async def test_opt_out_of_one_plan_or_all_skips_without_using_consent(store, fake, channel):
    plan = daily(consent="one_time")
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b", "o-c"], credits=2)
    lifecycle = Lifecycle(store)
    await lifecycle.opt_out("o-a", plan_id=plan.id, actor="token:crm", reason="asked to stop")
    await lifecycle.opt_out("o-b", plan_id=None, actor="token:crm", reason="deleted account")
    with pytest.raises(LifecycleError, match="already opted out of every plan"):
        await lifecycle.opt_out("o-b", plan_id=None, actor="x", reason="y")
    clock = Clock(datetime(2026, 3, 2, 1, 0, tzinfo=UTC))
    d = dispatcher(store, channel, clock)
    await d.fire(plan.id, clock.now)

    assert await outcomes(store, plan.id) == {
        (occ(2), "skipped", "opted_out"): 2,
        (occ(2), "sent", None): 1,
    }
    assert [m["touser"] for m in fake.messages] == ["o-c"]
    credits = {
        r["user_id"]: r["credits"]
        for r in await store.pool.fetch("SELECT user_id, credits FROM consent")
    }
    assert credits == {"o-a": 2, "o-b": 2, "o-c": 1}

    await lifecycle.opt_in("o-a", plan_id=plan.id, actor="token:crm")
    with pytest.raises(LifecycleError, match="opted out of every plan"):
        await lifecycle.opt_in("o-b", plan_id=plan.id, actor="token:crm")
    clock.now += timedelta(days=1)
    await d.fire(plan.id, clock.now)
    assert sorted(m["touser"] for m in fake.messages) == ["o-a", "o-c", "o-c"]
    trail = await lifecycle.audit(user_id="o-a")
    assert [e["action"] for e in trail] == ["opt_in", "opt_out"]
    assert trail[1]["reason"] == "asked to stop" and trail[1]["version"] == 1


async def test_stopping_one_enrolment_ends_that_timeline_only(store, fake, channel):
    plan = weekly_relative()
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b"])
    lifecycle = Lifecycle(store)
    await lifecycle.stop_enrollment(plan.id, "o-a", actor="cli:nurse", reason="discharged")
    with pytest.raises(LifecycleError, match="already stopped"):
        await lifecycle.stop_enrollment(plan.id, "o-a", actor="cli:nurse", reason="again")
    clock = Clock(datetime(2026, 3, 9, 1, 5, tzinfo=UTC))
    await dispatcher(store, channel, clock).fire(plan.id, clock.now)
    assert [m["touser"] for m in fake.messages] == ["o-b"]
