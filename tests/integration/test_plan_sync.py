"""Plans -> APScheduler schedules on PostgreSQL: only changed plans are re-added, and a re-add
never schedules a past occurrence."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from apscheduler import AsyncScheduler, ScheduleLookupError

from scheduler.app.daemon import Daemon, build_scheduler, schedule_id
from scheduler.planfiles import LoadedPlan, content_hash, parse_plan
from scheduler.store.postgres import Store
from tests.support import DAILY, daemon_on, daily, next_fire

WEEKLY_RELATIVE = """
id: rehab
name: Rehab
category: medical
consent: one_time
schedule:
  relative: {{every: 1 week, count: 4, at: "{at}"}}
template: {{id: tmpl, fields: {{thing1: thing}}}}
message: {{default: {{thing1: "Week {{step}} 仅供参考"}}}}
"""


def loaded(text: str) -> LoadedPlan:
    plan = parse_plan(text, "test.yaml")
    return LoadedPlan(plan, Path("test.yaml"), content_hash(plan))


async def test_unchanged_plans_are_not_re_added(store, db_url):
    async with daemon_on(store, db_url) as daemon:
        await _unchanged(daemon, daemon.scheduler)


async def _unchanged(daemon: Daemon, scheduler: AsyncScheduler) -> None:
    first = await daemon.sync_plans([loaded(DAILY.format(at="09:00", count=30))])
    before = await next_fire(scheduler, "daily")
    daemon.clock.now += timedelta(hours=1)
    # The same plan written differently (quoting, key order) is the same content.
    again = await daemon.sync_plans([loaded(DAILY.format(at="09:00", count=30) + "\n# note\n")])

    assert (first.added, again.added, again.unchanged) == (["daily"], [], ["daily"])
    assert await next_fire(scheduler, "daily") == before


async def test_a_changed_plan_is_re_added_without_firing_past_occurrences(store, db_url):
    async with daemon_on(store, db_url) as daemon:
        await _changed(daemon, daemon.scheduler, store)


async def _changed(daemon: Daemon, scheduler: AsyncScheduler, store: Store) -> None:
    await daemon.sync_plans([loaded(DAILY.format(at="09:00", count=30))])
    # Ten days later the team moves the time to 08:00; March 1-19 are in the past by then.
    daemon.clock.now = datetime(2026, 3, 20, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai
    result = await daemon.sync_plans([loaded(DAILY.format(at="08:00", count=30))])

    assert result.added == ["daily"]
    assert await next_fire(scheduler, "daily") == datetime(2026, 3, 21, 0, 0, tzinfo=UTC)
    record = await store.plan("daily")
    assert record.version == 2
    versions = await store.pool.fetch(
        "SELECT version, content_hash FROM plan_versions WHERE plan_id = 'daily' ORDER BY 1"
    )
    assert [v["version"] for v in versions] == [1, 2]


async def test_a_plan_with_no_occurrence_left_gets_no_schedule(store, db_url):
    async with daemon_on(store, db_url) as daemon:
        await _finished(daemon, daemon.scheduler)


async def _finished(daemon: Daemon, scheduler: AsyncScheduler) -> None:
    daemon.clock.now = datetime(2026, 6, 1, tzinfo=UTC)  # all 5 occurrences are in the past
    result = await daemon.sync_plans([loaded(DAILY.format(at="09:00", count=5))])

    assert result.finished == ["daily"]
    with pytest.raises(ScheduleLookupError):
        await scheduler.get_schedule(schedule_id("daily"))


async def test_a_changed_relative_plan_reschedules_every_enrolment(store, db_url):
    async with daemon_on(store, db_url) as daemon:
        await _relative_changed(daemon, store)


async def _relative_changed(daemon: Daemon, store: Store) -> None:
    await daemon.sync_plans([loaded(WEEKLY_RELATIVE.format(at="09:00"))])
    start = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai
    await store.enroll(
        "rehab", "o-a", start, "Asia/Shanghai", {}, datetime(2026, 3, 9, 1, 0, tzinfo=UTC)
    )

    await daemon.sync_plans([loaded(WEEKLY_RELATIVE.format(at="18:30"))])

    due = await store.pool.fetchval("SELECT next_due_at FROM enrollments WHERE user_id = 'o-a'")
    assert due == datetime(2026, 3, 9, 10, 30, tzinfo=UTC)  # 18:30 in Shanghai, a week on


async def test_replicas_starting_together_all_set_up_the_scheduler(store: Store, db_url: str):
    """APScheduler's CREATE SCHEMA/TABLE IF NOT EXISTS races between replicas; they take turns."""

    async def start_replica(name: str) -> str:
        async with AsyncExitStack() as stack:
            scheduler = await build_scheduler(store, db_url, name, stack)
            return scheduler.identity

    names = [f"replica-{i}" for i in range(4)]
    assert await asyncio.gather(*(start_replica(n) for n in names)) == names


async def test_an_edit_after_going_back_to_older_content_gets_a_new_version(store: Store):
    # A, B, back to A (version 1 again), then new content C: version 3, not a clash with B's 2.
    a = daily()
    b = a.model_copy(update={"name": "Daily B"})
    c = a.model_copy(update={"name": "Daily C"})
    versions = [(await store.register_plan(p, "daily.yaml")).record.version for p in (a, b, a, c)]
    assert versions == [1, 2, 1, 3]
    assert (await store.plan(a.id)).version == 3
