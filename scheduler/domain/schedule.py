"""Schedule maths: when each step of a plan is due. Pure: the clock is always passed in.

Calendar plans become APScheduler triggers (one schedule per plan in the daemon); `preview` and the
daemon's step numbering iterate the very same triggers. Relative plans are computed per enrolment by
`relative_due`, which the daemon stores as each enrolment's next due time.

Wall-clock rules keep their local time across daylight-saving changes: a time that does not exist
(spring forward) fires when the clock has moved past it (02:30 -> 03:30), and a time that happens
twice (fall back) fires once, at its first instance.
"""

from __future__ import annotations

import calendar as _calendar
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import MAXYEAR, UTC, date, datetime, time, timedelta
from itertools import islice
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler._marshalling import marshal_object, unmarshal_object
from apscheduler.abc import Trigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from scheduler.domain.official_days import official_day, source, unknown_years
from scheduler.domain.plan import Calendar, Duration, Plan, Relative

# A plan's fire times are enumerated to number its steps; this bounds the work for plans without a
# count that fire very often (a step number past it is reported as unknown, never wrong).
MAX_ENUMERATED_STEPS = 200_000


def require_aware(moment: datetime, what: str = "time") -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{what} must carry a time zone: {moment.isoformat()}")
    return moment


def check_crontab(expr: str, timezone: str) -> None:
    """Raise ValueError with a plain reason if `expr` is not a usable 5-field crontab."""
    try:
        CronTrigger.from_crontab(expr, timezone=ZoneInfo(timezone))
    except (ValueError, IndexError) as exc:  # IndexError: APScheduler on a weekday past 7
        why = exc if isinstance(exc, ValueError) else "a field is out of range"
        # "cron: " first, so a plan file's error names the field schedule.calendar.cron
        raise ValueError(f"cron: {expr[:100]!r} is not a valid crontab ({why})") from None


def localize(value: datetime | date, tz: ZoneInfo, *, end_of_day: bool = False) -> datetime:
    """A plan's local date or datetime as an aware datetime (naive values are in `tz`)."""
    if not isinstance(value, datetime):
        value = datetime.combine(value, time.max if end_of_day else time.min)
    return value if value.tzinfo else value.replace(tzinfo=tz)


# --- calendar plans -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Occurrence:
    step: int  # from 1
    due_at: datetime  # aware, UTC


def calendar_anchor(cal: Calendar, registered_at: datetime) -> datetime:
    """The first moment a calendar plan may fire: its `start`, or when it was first loaded."""
    tz = ZoneInfo(cal.timezone)
    return localize(cal.start, tz) if cal.start is not None else require_aware(registered_at)


def _trigger(cal: Calendar, start: datetime, end: datetime | None) -> Trigger:
    """The plan's rule as an APScheduler trigger, with its day rules (working days, holidays,
    except/extra dates) applied by `DayRulesTrigger` when it has any."""
    base, times = _rule_trigger(cal, start, end)
    if not (cal.workdays or cal.skip_holidays or cal.except_dates or cal.extra_dates):
        return base
    tz = ZoneInfo(cal.timezone)
    extra = sorted(
        moment
        for day in cal.extra_dates
        for t in times
        if start <= (moment := localize(datetime.combine(day, t), tz))
        and (end is None or moment <= end)
    )
    return DayRulesTrigger(
        base,
        cal.timezone,
        workdays=cal.workdays.calendar if cal.workdays else None,
        skip_holidays=cal.skip_holidays,
        except_dates=cal.except_dates,
        extra=extra,
    )


def _rule_trigger(
    cal: Calendar, start: datetime, end: datetime | None
) -> tuple[Trigger, list[time]]:
    tz = ZoneInfo(cal.timezone)
    if cal.every is not None:
        return IntervalTrigger(
            seconds=cal.every.as_timedelta().total_seconds(),
            start_time=start,
            end_time=end,  # type: ignore[arg-type]  # None is its default; the stub omits it
        ), []
    # APScheduler 4.0.0a6's CronTrigger reads start_time's wall clock as if it were in the
    # trigger's zone (09:00 UTC would "match" 09:00 Shanghai), and returns a start_time inside a
    # matching second as is (09:00:00.5): give it whole seconds in the plan's zone.
    if start.microsecond:
        start = start.replace(microsecond=0) + timedelta(seconds=1)
    start, end = start.astimezone(tz), end.astimezone(tz) if end is not None else None
    if cal.cron is not None:
        return CronTrigger.from_crontab(cal.cron, start_time=start, end_time=end, timezone=tz), []
    fields: list[dict[str, str]]
    if cal.weekly is not None:
        fields, times = [{"day_of_week": ",".join(cal.weekly.days)}], cal.weekly.at
    elif cal.monthly is not None:
        fields, times = [{"day": str(cal.monthly.day)}], cal.monthly.at
        short = _short_months(cal.monthly.day)
        if short and cal.monthly.short_months == "last_day":  # and the last day of the others
            fields.append({"month": ",".join(str(m) for m in short), "day": "last"})
    elif cal.weekdays is not None:
        fields, times = [{"day_of_week": "mon-fri"}], cal.weekdays.at
    elif cal.workdays is not None:  # every day: DayRulesTrigger keeps the working ones
        fields, times = [{}], cal.workdays.at
    else:
        assert cal.daily is not None
        fields, times = [{}], cal.daily.at
    times = sorted(set(times))
    triggers: list[Trigger] = [
        CronTrigger(
            **days,
            hour=t.hour,
            minute=t.minute,
            second=t.second,
            start_time=start,
            end_time=end,  # type: ignore[arg-type]  # as above
            timezone=tz,
        )
        for t in times
        for days in fields
    ]
    return (triggers[0] if len(triggers) == 1 else OrTrigger(triggers)), times


NOT_WORKING = "not an official working day"


class DayRulesTrigger(Trigger):
    """A rule's trigger with the plan's day rules: only a country's official working days
    (`workdays`), none of its statutory holidays (`skip_holidays`), none of `except_dates`, and
    the fire times of `extra_dates` added. Serialized as JSON by APScheduler's data store."""

    def __init__(
        self,
        inner: Trigger,
        timezone: str,
        *,
        workdays: str | None = None,
        skip_holidays: str | None = None,
        except_dates: Iterable[date] = (),
        extra: Iterable[datetime] = (),
    ):
        self.inner = inner
        self.timezone = timezone
        self.workdays = workdays
        self.skip_holidays = skip_holidays
        self.except_dates = frozenset(except_dates)
        self.extra = sorted(extra)
        self._extra_index = 0
        self._candidate: datetime | None = None  # the inner's next fire time, kept, not returned
        self._inner_done = False

    def why_not(self, fire_time: datetime) -> str | None:
        """Why a fire time of the rule is left out, or None when it fires."""
        day = fire_time.astimezone(ZoneInfo(self.timezone)).date()
        if day in self.except_dates:
            return "except_dates"
        if self.workdays is not None:
            official = official_day(self.workdays, day)
            if not official.working:
                return official.holiday or NOT_WORKING
        if self.skip_holidays is not None:
            holiday = official_day(self.skip_holidays, day).holiday
            if holiday is not None:
                return holiday
        return None

    def next(self) -> datetime | None:
        while self._candidate is None and not self._inner_done:
            fire_time = _next(self.inner)
            if fire_time is None:
                self._inner_done = True
            elif self.why_not(fire_time) is None:
                self._candidate = fire_time
        extra = self.extra[self._extra_index] if self._extra_index < len(self.extra) else None
        if self._candidate is not None and (extra is None or self._candidate <= extra):
            fire_time, self._candidate = self._candidate, None
            if extra == fire_time:  # an extra date the rule fires on anyway: once
                self._extra_index += 1
            return fire_time
        if extra is not None:
            self._extra_index += 1
        return extra

    def __getstate__(self) -> dict[str, Any]:
        return {
            "version": 1,
            "inner": marshal_object(self.inner),
            "timezone": self.timezone,
            "workdays": self.workdays,
            "skip_holidays": self.skip_holidays,
            "except_dates": sorted(d.isoformat() for d in self.except_dates),
            "extra": [t.isoformat() for t in self.extra],
            "extra_index": self._extra_index,
            "candidate": self._candidate.isoformat() if self._candidate else None,
            "inner_done": self._inner_done,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.inner = unmarshal_object(*state["inner"])
        self.timezone = state["timezone"]
        self.workdays, self.skip_holidays = state["workdays"], state["skip_holidays"]
        self.except_dates = frozenset(date.fromisoformat(d) for d in state["except_dates"])
        self.extra = [datetime.fromisoformat(t) for t in state["extra"]]
        self._extra_index = state["extra_index"]
        candidate = state["candidate"]
        self._candidate = datetime.fromisoformat(candidate) if candidate else None
        self._inner_done = state["inner_done"]


def _short_months(day: int | str) -> list[int]:
    """The months that can lack a monthly `day` (February counted for 29 too: most years)."""
    if not isinstance(day, int) or day < 29:
        return []
    return [2] if day < 31 else [2, 4, 6, 9, 11]


def skipped_days(cal: Calendar, start: datetime, until: datetime) -> list[tuple[datetime, str]]:
    """The rule's fire times in [start, until] that its day rules leave out, with why."""
    trigger = _trigger(cal, start, until)
    if not isinstance(trigger, DayRulesTrigger):
        return []
    base = _rule_trigger(cal, start, until)[0]
    extra = set(trigger.extra)
    out: list[tuple[datetime, str]] = []
    while (fire_time := _next(base)) is not None and len(out) < MAX_ENUMERATED_STEPS:
        why = None if fire_time in extra else trigger.why_not(fire_time)
        if why is not None and why != NOT_WORKING:  # ordinary weekends go without saying
            out.append((fire_time.astimezone(UTC), why))
    return out


def schedule_warnings(cal: Calendar, anchor: datetime) -> list[str]:
    """What a plan's author should know about its schedule: years its official calendar does not
    know yet (the fallback applies), monthly days some months do not have."""
    warnings = []
    country = cal.workdays.calendar if cal.workdays else cal.skip_holidays
    if country is not None:
        end = calendar_end(cal, anchor) or anchor + timedelta(days=366)
        years = unknown_years(country, anchor.date(), end.date())
        if years:
            shown = ", ".join(str(y) for y in years[:5]) + (" ..." if len(years) > 5 else "")
            warnings.append(
                f"the {country} calendar ({source(country)}) does not know {shown} yet: there"
                " Monday to Friday are working days and no holiday is skipped; upgrade"
                " chinesecalendar once the year's notice is published"
            )
    monthly = cal.monthly
    if monthly is not None and monthly.short_months == "skip" and _short_months(monthly.day):
        months = {29: "February (except in leap years)", 30: "February"}.get(
            monthly.day,  # type: ignore[arg-type]
            "February, April, June, September and November",
        )
        warnings.append(
            f"monthly.day {monthly.day}: {months} have no day {monthly.day}, so those months have"
            " no occurrence; write `short_months: last_day` to send on their last day instead"
            " (or `day: last` for the last day of every month)"
        )
    return warnings


def is_repeated_wall_time(fire_time: datetime, timezone: str) -> bool:
    """True for the second instance of a local time that happens twice (DST fall-back)."""
    local = fire_time.astimezone(ZoneInfo(timezone))
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _next(trigger: Trigger) -> datetime | None:
    try:
        return trigger.next()
    except (OverflowError, ValueError):  # past year 9999: there is no later fire time
        return None


def _fire_times(cal: Calendar, start: datetime, end: datetime | None) -> Iterator[datetime]:
    trigger = _trigger(cal, start, end)
    wall_clock = cal.every is None
    while (fire_time := _next(trigger)) is not None:
        if wall_clock and is_repeated_wall_time(fire_time, cal.timezone):
            continue
        yield fire_time.astimezone(UTC)


def _end_field(cal: Calendar) -> datetime | None:
    return localize(cal.end, ZoneInfo(cal.timezone), end_of_day=True) if cal.end else None


def calendar_end(cal: Calendar, anchor: datetime) -> datetime | None:
    """The last moment the plan may fire: its `end`, or its `count`-th occurrence if earlier.
    Walks `count` fire times (bounded by limits.MAX_COUNT), keeping only the last."""
    end = _end_field(cal)
    if cal.count is not None:
        last = deque(islice(_fire_times(cal, anchor, end), cal.count), maxlen=1)
        if last:
            end = last[0] if end is None else min(end, last[0])
    return end


def calendar_occurrences(cal: Calendar, anchor: datetime) -> Iterator[Occurrence]:
    """Every occurrence of a calendar plan from its anchor, numbered from 1. Lazy: taking the
    first few costs a few fire times, whatever the plan's `count`."""
    require_aware(anchor, "anchor")
    fire_times = islice(_fire_times(cal, anchor, _end_field(cal)), cal.count)
    for step, fire_time in enumerate(fire_times, start=1):
        yield Occurrence(step, fire_time)


def calendar_trigger(cal: Calendar, anchor: datetime, now: datetime) -> Trigger | None:
    """The trigger the daemon schedules: occurrences from `now` on (never a past one), or None
    if the plan has no occurrence left."""
    require_aware(now, "now")
    require_aware(anchor, "anchor")
    end = calendar_end(cal, anchor)
    start = max(anchor, now)
    if cal.every is not None:  # keep the interval's phase, counted from the anchor
        step = cal.every.as_timedelta()
        start = anchor + step * -(-(start - anchor) // step)
    if end is not None and start > end:
        return None
    # An `end` later than the last fire time (e.g. the end of the last day) leaves none to fire.
    if next(_fire_times(cal, start, end), None) is None:
        return None
    return _trigger(cal, start, end)


def calendar_step(cal: Calendar, anchor: datetime, fire_time: datetime) -> int | None:
    """The step number of `fire_time`, or None if it is not an occurrence of this plan."""
    require_aware(anchor, "anchor")
    # In UTC: a local time inside a DST fold never compares equal (==) to another zone's time
    # (PEP 495), so 01:30 New York time on a fall-back night would never match its occurrence.
    fire_time = require_aware(fire_time, "fire time").astimezone(UTC)
    if cal.every is not None:
        steps, rest = divmod(fire_time - anchor, cal.every.as_timedelta())
        in_range = rest == timedelta(0) and steps >= 0
        return steps + 1 if in_range and (cal.count is None or steps < cal.count) else None
    for occurrence, _ in zip(
        calendar_occurrences(cal, anchor), range(MAX_ENUMERATED_STEPS), strict=False
    ):
        if occurrence.due_at == fire_time:
            return occurrence.step
        if occurrence.due_at > fire_time:
            return None
    return None


# --- relative plans -----------------------------------------------------------------------------


def _add_months(day: date, months: int) -> date:
    month_index = day.month - 1 + months
    year, month = day.year + month_index // 12, month_index % 12 + 1
    if year > MAXYEAR:
        raise OverflowError("past the last date")
    return date(year, month, min(day.day, _calendar.monthrange(year, month)[1]))


def _shift(local: datetime, duration: Duration, times: int = 1) -> datetime:
    """`local` moved by `duration` x `times`: calendar units keep the wall-clock time."""
    n = duration.amount * times
    if duration.unit == "month":
        return datetime.combine(_add_months(local.date(), n), local.timetz()).replace(
            tzinfo=local.tzinfo
        )
    if duration.unit in ("day", "week"):
        days = n * (7 if duration.unit == "week" else 1)
        return (local.replace(tzinfo=None) + timedelta(days=days)).replace(tzinfo=local.tzinfo)
    return (local.astimezone(UTC) + duration.as_timedelta() * times).astimezone(local.tzinfo)


def relative_due(rule: Relative, start: datetime, tz: ZoneInfo, index: int) -> datetime | None:
    """When step `index` (from 0) of one enrolment is due (UTC), or None when the plan is over.

    Step times are computed from the start each time, never by adding to the previous step, so
    month ends and DST changes cannot make them drift.
    """
    require_aware(start, "enrolment start")
    if index < 0 or (rule.count is not None and index >= rule.count):
        return None
    local_start = start.astimezone(tz)
    # With `first_after` under a day, some of the first day's times may precede the enrolment:
    # they are not part of this user's timeline.
    early = sum(
        1 for slot in range(len(rule.at or ())) if _raw_due(rule, local_start, slot) < start
    )
    try:
        due = _raw_due(rule, local_start, index + early)
    except OverflowError:  # past year 9999: the plan is over
        return None
    if rule.duration is not None and due > _shift(local_start, rule.duration).astimezone(UTC):
        return None
    return due


def _raw_due(rule: Relative, local_start: datetime, raw_index: int) -> datetime:
    times = sorted(rule.at) if rule.at else None
    period, slot = divmod(raw_index, len(times) if times else 1)
    first = rule.first_after or rule.every
    if first.unit == rule.every.unit:
        # One shift from the start: Jan 31 + 2 months is Mar 31, not (Jan 31 + 1 month) + 1 month.
        # model_construct: a sum of steps, not a duration a plan wrote (nor bound by its limit)
        total = Duration.model_construct(
            amount=first.amount + rule.every.amount * period, unit=first.unit
        )
        due_local = _shift(local_start, total)
    else:
        due_local = _shift(_shift(local_start, first), rule.every, period)
    if times:
        due_local = datetime.combine(due_local.date(), times[slot]).replace(
            tzinfo=local_start.tzinfo
        )
    # Through UTC: a local time that does not exist (spring forward) moves past the gap.
    return due_local.astimezone(UTC)


def relative_occurrences(plan: Plan, start: datetime, tz: ZoneInfo) -> Iterator[Occurrence]:
    rule = plan.schedule.relative
    assert rule is not None
    index = 0
    while (due := relative_due(rule, start, tz, index)) is not None:
        index += 1
        yield Occurrence(index, due)
