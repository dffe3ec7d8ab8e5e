"""`reminders run --demo`: messages flowing within seconds of a first start, against the fake.

Enrols three demo users (with consent) in every loaded plan, and adds one short demo plan that
fires every 10 seconds, so the quick start shows the whole pipeline at work without
waiting for the example plans' real dates.
"""

from __future__ import annotations

import logging
from datetime import datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

from scheduler.domain.policy import PlanException, QuietWindow
from scheduler.domain.schedule import relative_due
from scheduler.planfiles import LoadedPlan, content_hash, parse_plan
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

DEMO_USERS = ("demo-user-1", "demo-user-2", "demo-user-3")
DEMO_PLAN = """
id: demo-ticker
name: Demo ticker
category: transport
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    every: 10 seconds
template:
  id: demo_tick_tmpl
  fields:
    thing1: thing
    number2: number
message:
  default:
    thing1: "演示提醒 {user}"
    number2: "{step}"
"""


# A message every 10 seconds breaks every cap and quiet hour there is: the demo plan alone is
# exempt, so the quick start shows messages at any hour (the example plans keep the real rules).
DEMO_EXCEPTIONS = {
    "demo-ticker": PlanException(
        reason="demo: a message every 10 seconds",
        user_day=1_000_000,
        category_week=1_000_000,
        quiet_hours=QuietWindow(start=time(0), end=time(0)),
    )
}


def demo_plan() -> LoadedPlan:
    plan = parse_plan(DEMO_PLAN, "<demo>")
    return LoadedPlan(plan, Path("<demo>"), content_hash(plan))


async def seed(store: Store, loaded: list[LoadedPlan], now: datetime) -> None:
    """Enrol the demo users in every plan and grant them consent for its template."""
    for item in loaded:
        plan = item.plan
        tz = ZoneInfo(
            plan.schedule.calendar.timezone if plan.schedule.calendar else "Asia/Shanghai"
        )
        variables = {name: "演示" for name in plan.variables}
        rule = plan.schedule.relative
        for user in DEMO_USERS:
            due = relative_due(rule, now, tz, 0) if rule is not None else None
            await store.enroll(plan.id, user, now, tz.key, variables, due)
            for _ in range(3 if plan.consent.value == "one_time" else 1):
                await store.record_consent(
                    user, plan.template.id, plan.consent.value, "accept", "demo"
                )
    log.warning(
        "DEMO: enrolled %s in %d plans with consent; the plan demo-ticker sends every 10 s",
        ", ".join(DEMO_USERS),
        len(loaded),
    )
