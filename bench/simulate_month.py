"""A month of the example plans in virtual time, then `reminders status` as of the month's end.

    .venv/bin/python bench/simulate_month.py            # a throwaway embedded PostgreSQL
    DATABASE_URL=postgresql://... .venv/bin/python bench/simulate_month.py

The real dispatcher and the real store run against a fake WeChat on loopback; only the clock is
virtual (December 2026). Along the way an admin pauses and resumes plans (skip and catch-up), opts a
user out, stops an enrolment, WeChat answers a few errors, and one-time credits run out.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.app.dispatcher import Dispatcher  # noqa: E402
from scheduler.app.lifecycle import Lifecycle, process_catch_up  # noqa: E402
from scheduler.app.status import overview, plan_status, render_overview, render_plan  # noqa: E402
from scheduler.channels.wechat import WeChatChannel  # noqa: E402
from scheduler.domain.schedule import calendar_anchor, calendar_occurrences, relative_due  # noqa: E402
from scheduler.planfiles import load_plans, load_policy  # noqa: E402
from scheduler.store.postgres import Store  # noqa: E402
from scheduler.testing.fake_wechat import FakeWeChat  # noqa: E402

SHANGHAI = ZoneInfo("Asia/Shanghai")
START = datetime(2026, 12, 1, tzinfo=SHANGHAI).astimezone(UTC)
END = datetime(2026, 12, 31, 23, 0, tzinfo=SHANGHAI).astimezone(UTC)
USERS = [f"o-user-{i}" for i in range(1, 6)]
PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def day(n: int, hour: int = 12) -> datetime:
    return datetime(2026, 12, n, hour, tzinfo=SHANGHAI).astimezone(UTC)


async def simulate(url: str) -> None:
    async with Store.open(url) as store:
        await store.migrate()
        fake = FakeWeChat()
        await fake.start()
        channel = WeChatChannel(base_url=fake.base_url, appid="sim", secret="sim", retries=1)
        clock = Clock(START)
        dispatcher = Dispatcher(
            store, channel, replica_id="sim-replica", clock=clock, policy=load_policy(PLANS_DIR)
        )
        lifecycle = Lifecycle(store, clock=clock)
        loaded, _ = load_plans([PLANS_DIR])
        plans = {item.plan.id: item.plan for item in loaded}
        for item in loaded:
            plan = item.plan
            await store.register_plan(plan, f"plans/{item.path.name}")
            for i, user in enumerate(USERS):
                start = START + timedelta(days=i * 3, hours=2)  # rehab: surgeries 3 days apart
                due = (
                    relative_due(plan.schedule.relative, start, SHANGHAI, 0)
                    if plan.schedule.relative
                    else None
                )
                names = ["张三", "李四", "王五", "赵六", "孙七"]
                variables = {"name": names[i], "patient": names[i], "hospital": "协和"}
                variables = {k: v for k, v in variables.items() if k in plan.variables}
                await store.enroll(plan.id, user, start, "Asia/Shanghai", variables, due)
                if plan.consent.value == "long_term":
                    await store.record_consent(user, plan.template.id, "long_term", "accept", "sim")
                else:  # one-time: user i granted 10*i credits (user 1 runs dry soonest)
                    for _ in range(3 if plan.is_relative else 10 * (i + 1)):
                        await store.record_consent(
                            user, plan.template.id, "one_time", "accept", "sim"
                        )

        # The store stamps registration with the real clock, and a calendar plan without a start
        # date counts from it: the simulated month starts at registration.
        await store.pool.execute("UPDATE plans SET registered_at = $1", START)

        # Every calendar fire in December, and an hourly sweep for the relative plan (and for the
        # deferred sends whose moment has come, as the daemon does every sweep period).
        events: list[tuple[datetime, str]] = []
        for plan in plans.values():
            if plan.schedule.calendar is None:
                continue
            record = await store.plan(plan.id)
            anchor = calendar_anchor(plan.schedule.calendar, record.registered_at)
            for occurrence in calendar_occurrences(plan.schedule.calendar, anchor):
                if occurrence.due_at > END:
                    break
                if occurrence.due_at >= START:
                    events.append((occurrence.due_at, plan.id))
        t = START
        while t <= END:
            events.append((t, "rehab-weekly"))
            t += timedelta(hours=1)
        admin = [
            (day(8, 7), "pause", "commute-line2", "wrong station in the text"),
            (day(10, 12), "resume", "commute-line2", None),  # skip: two weekdays held back
            (day(14), "opt-out", "o-user-3", "asked to stop everything"),
            (day(16, 6), "pause", "practice-30days", "checking the wording"),
            (day(16, 9), "resume-catch-up", "practice-30days", None),  # 08:00 is 1 h late
            (day(20), "stop", "rehab-weekly:o-user-5", "discharged early"),
            (day(22), "errors", "", None),
        ]
        events.sort()
        for when, plan_id in events:
            while admin and admin[0][0] <= when:
                at, action, target, reason = admin.pop(0)
                clock.now = at
                actor = "token:ops"
                if action == "pause":
                    await lifecycle.pause(target, actor=actor, reason=reason)
                elif action == "resume":
                    await lifecycle.resume(target, actor=actor, reason="fixed")
                elif action == "resume-catch-up":
                    await lifecycle.resume(target, actor=actor, catch_up=True, reason="ok")
                    await process_catch_up(store, dispatcher, clock=clock)
                elif action == "opt-out":
                    await lifecycle.opt_out(target, plan_id=None, actor=actor, reason=reason)
                elif action == "stop":
                    plan_ref, user = target.split(":")
                    await lifecycle.stop_enrollment(plan_ref, user, actor=actor, reason=reason)
                elif action == "errors":
                    fake.inject(errcodes=[43101, 40003], times=1)
            clock.now = when + timedelta(seconds=2)
            await dispatcher.fire(plan_id, when)
            for deferred in await store.plans_with_due_deferrals(clock.now):
                await dispatcher.retry_deferred(deferred)

        await store.heartbeat("sim-replica", socket.gethostname(), os.getpid())
        as_of = END + timedelta(minutes=30)
        print(render_overview(await overview(store, now=as_of)))
        for plan_id in sorted(plans):
            print()
            print(render_plan(await plan_status(store, plan_id, now=as_of, next_n=3)))
        await channel.aclose()
        await fake.stop()


def main() -> None:
    if os.environ.get("DATABASE_URL"):
        asyncio.run(simulate(os.environ["DATABASE_URL"]))
        return
    import pgserver

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(tempfile.mkdtemp(prefix="reminders-sim-"), cleanup_mode="stop")
    try:
        asyncio.run(simulate(server.get_uri()))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
