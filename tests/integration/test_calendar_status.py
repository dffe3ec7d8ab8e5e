"""`reminders status` says when a plan runs into a year its official calendar does not know."""

from __future__ import annotations

from datetime import UTC, datetime

from scheduler.app.status import plan_status, render_plan
from scheduler.domain.plan import Plan
from tests.support import calendar_plan, register


async def test_status_warns_about_a_year_the_calendar_does_not_know(store):
    data = calendar_plan().model_dump(mode="json")
    data["schedule"]["calendar"] = {
        "timezone": "Asia/Shanghai",
        "workdays": {"at": "07:30", "calendar": "CN"},
        "start": "2027-01-04",
    }
    await register(store, Plan.model_validate(data))

    report = await plan_status(store, "alerts", now=datetime(2026, 12, 2, tzinfo=UTC))

    assert report is not None
    [warning] = report["warnings"]
    assert "does not know 2027" in warning
    assert f"warning     {warning}" in render_plan(report)
