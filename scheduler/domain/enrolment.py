"""Checking one enrolment against its plan, for every way in (API, CSV import, CLI). Pure.

`prepare` is the one place that decides what an enrolment needs: a user id of WeChat's openid
shape, an aware start time, an IANA time zone, the plan's variables (and no others), and, for a
relative plan, when its first step is due.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.domain.plan import Plan
from scheduler.domain.schedule import relative_due

# WeChat openids are 28 characters of this alphabet; allow 1-64 to be safe with other issuers.
OPENID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DEFAULT_TZ = "Asia/Shanghai"


class EnrolmentError(ValueError):
    """One enrolment is not acceptable; `field` names what to fix."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True, slots=True)
class Enrolment:
    plan_id: str
    user_id: str
    start_at: datetime
    tz: str
    variables: dict[str, Any]
    next_due_at: datetime | None  # relative plans: when step 1 is due; None for calendar plans


def check_openid(value: Any, field: str = "openid") -> str:
    if not isinstance(value, str) or not OPENID.match(value):
        raise EnrolmentError(
            field, f"{value!r} is not an openid (1-64 characters of A-Z, a-z, 0-9, '_' and '-')"
        )
    return value


def zone(name: str, field: str = "tz") -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise EnrolmentError(
            field, f"{name!r} is not an IANA time zone, e.g. Asia/Shanghai"
        ) from None


def parse_start(text: str, tz: ZoneInfo | None = None, field: str = "start") -> datetime:
    """An ISO date-time; without an offset it is read in `tz` when given, refused otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise EnrolmentError(
            field, f"{text!r} is not an ISO date-time, e.g. 2026-03-01T09:00+08:00"
        ) from None
    if moment.tzinfo is None:
        if tz is None:
            raise EnrolmentError(field, f"{text!r} needs a UTC offset, e.g. 2026-03-01T09:00+08:00")
        moment = moment.replace(tzinfo=tz)
    return moment


def default_zone(plan: Plan) -> str:
    return plan.schedule.calendar.timezone if plan.schedule.calendar else DEFAULT_TZ


def check_variable_names(plan: Plan, names: set[str], field: str = "variables") -> None:
    unknown = sorted(names - set(plan.variables))
    if unknown:
        declared = ", ".join(plan.variables) or "none"
        raise EnrolmentError(
            field,
            f"not variables of plan {plan.id}: {', '.join(unknown)} (it declares: {declared})",
        )


def prepare(
    plan: Plan,
    user_id: Any,
    start: datetime | None,
    tz: str | None,
    variables: dict[str, Any],
    now: datetime,
) -> Enrolment:
    """A checked enrolment, with its first due time; raises `EnrolmentError`."""
    check_openid(user_id)
    zone_name = tz or default_zone(plan)
    zone_info = zone(zone_name)
    if start is None:
        start = now
    elif start.tzinfo is None or start.utcoffset() is None:
        raise EnrolmentError("start", "needs a UTC offset, e.g. 2026-03-01T09:00+08:00")
    check_variable_names(plan, set(variables))
    missing = [v for v in plan.variables if variables.get(v) in (None, "")]
    if missing:
        raise EnrolmentError("variables", f"plan {plan.id} needs: {', '.join(missing)}")
    for name, value in variables.items():
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise EnrolmentError(f"variables.{name}", "must be text or a number")
    rule = plan.schedule.relative
    next_due = relative_due(rule, start, zone_info, 0) if rule is not None else None
    return Enrolment(plan.id, user_id, start, zone_info.key, dict(variables), next_due)
