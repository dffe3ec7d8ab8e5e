"""Schedule maths in virtual time: every instant is passed in, nothing sleeps or reads the clock."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta
from itertools import islice
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from scheduler.domain.messages import RenderError, render
from scheduler.domain.plan import Calendar, Plan, Relative
from scheduler.domain.schedule import (
    Occurrence,
    calendar_anchor,
    calendar_occurrences,
    calendar_step,
    calendar_trigger,
    relative_due,
    relative_occurrences,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")
EDT, EST = timedelta(hours=-4), timedelta(hours=-5)
# Registration time for calendar plans with a `start`: never used by them, so any instant will do.
LOADED = datetime(2020, 1, 1, tzinfo=UTC)


def calendar(**rule: Any) -> Calendar:
    return Calendar.model_validate(rule)


def relative(**rule: Any) -> Relative:
    return Relative.model_validate(rule)


def occurrences(
    cal: Calendar, anchor: datetime | None = None, limit: int = 5000
) -> list[Occurrence]:
    anchor = anchor or calendar_anchor(cal, LOADED)
    return list(islice(calendar_occurrences(cal, anchor), limit))


def dues(rule: Relative, start: datetime, tz: ZoneInfo, limit: int = 5000) -> list[datetime]:
    """The enrolment's due times in its own zone, until `relative_due` says the plan is over."""
    found: list[datetime] = []
    while len(found) < limit and (due := relative_due(rule, start, tz, len(found))) is not None:
        assert due.utcoffset() == timedelta(0)
        found.append(due.astimezone(tz))
    return found


def trigger_times(
    cal: Calendar, anchor: datetime, now: datetime, limit: int = 5000
) -> list[datetime]:
    trigger = calendar_trigger(cal, anchor, now)
    if trigger is None:
        return []

    def times() -> Iterator[datetime]:
        while (fire_time := trigger.next()) is not None:
            yield fire_time

    return list(islice(times(), limit))


def local(occurrence: Occurrence, tz: ZoneInfo) -> datetime:
    return occurrence.due_at.astimezone(tz)


# --- calendar plans -------------------------------------------------------------------------------


def test_monthly_on_day_5_across_a_year() -> None:
    cal = calendar(
        timezone="Asia/Shanghai",
        monthly={"day": 5, "at": "09:00"},
        start="2026-01-01",
        end="2026-12-31",
    )
    found = occurrences(cal)
    assert [o.step for o in found] == list(range(1, 13))
    assert [local(o, SHANGHAI).isoformat() for o in found] == [
        f"2026-{month:02d}-05T09:00:00+08:00" for month in range(1, 13)
    ]
    assert all(o.due_at.tzinfo is UTC and o.due_at.hour == 1 for o in found)


@pytest.mark.parametrize(
    ("year", "february"),
    [(2026, 28), (2028, 29)],
    ids=["common-year", "leap-year"],
)
def test_monthly_on_the_last_day(year: int, february: int) -> None:
    cal = calendar(monthly={"day": "last", "at": "18:00"}, start=f"{year}-01-01", count=12)
    days = [local(o, SHANGHAI).date() for o in occurrences(cal)]
    expected = [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
    assert days == [date(year, month, day) for month, day in enumerate(expected, start=1)]


def test_daily_twice_for_30_days() -> None:
    cal = calendar(daily={"at": ["20:00", "08:00"]}, start="2026-12-01", count=60)
    found = occurrences(cal)
    assert len(found) == 60
    assert [o.step for o in found] == list(range(1, 61))
    times = [local(o, SHANGHAI) for o in found]
    assert times[0].isoformat() == "2026-12-01T08:00:00+08:00"
    assert times[1].isoformat() == "2026-12-01T20:00:00+08:00"
    assert times[-1].isoformat() == "2026-12-30T20:00:00+08:00"
    assert {t.date() for t in times} == {date(2026, 12, d) for d in range(1, 31)}


def test_weekdays_only() -> None:
    cal = calendar(weekdays={"at": "07:30"}, start="2026-03-01", end="2026-03-21")  # Sun..Sat
    days = [local(o, SHANGHAI).date() for o in occurrences(cal)]
    assert len(days) == 15
    assert all(day.weekday() < 5 for day in days)
    assert days[0] == date(2026, 3, 2) and days[-1] == date(2026, 3, 20)


def test_weekly_on_two_days() -> None:
    cal = calendar(weekly={"days": ["Fri", "tue"], "at": "19:00"}, start="2026-03-01", count=6)
    days = [local(o, SHANGHAI).strftime("%a %d") for o in occurrences(cal)]
    assert days == ["Tue 03", "Fri 06", "Tue 10", "Fri 13", "Tue 17", "Fri 20"]


def test_cron_in_local_time() -> None:
    cal = calendar(timezone="America/New_York", cron="15 7 * * sat", start="2026-03-01", count=2)
    assert [local(o, NEW_YORK).isoformat() for o in occurrences(cal)] == [
        "2026-03-07T07:15:00-05:00",
        "2026-03-14T07:15:00-04:00",
    ]


@pytest.mark.parametrize(
    ("day", "utc_hour", "offset"),
    [
        (date(2026, 3, 7), 14, EST),
        (date(2026, 3, 8), 13, EDT),  # spring forward at 02:00
        (date(2026, 3, 9), 13, EDT),
        (date(2026, 10, 31), 13, EDT),
        (date(2026, 11, 1), 14, EST),  # fall back at 02:00
        (date(2026, 11, 2), 14, EST),
    ],
    ids=str,
)
def test_new_york_daily_0900_stays_at_0900_across_dst(
    day: date, utc_hour: int, offset: timedelta
) -> None:
    cal = calendar(
        timezone="America/New_York", daily={"at": "09:00"}, start="2026-03-01", end="2026-11-30"
    )
    on_day = [o for o in occurrences(cal) if local(o, NEW_YORK).date() == day]
    assert len(on_day) == 1
    assert on_day[0].due_at.hour == utc_hour
    assert local(on_day[0], NEW_YORK).time() == time(9, 0)
    assert local(on_day[0], NEW_YORK).utcoffset() == offset


def test_new_york_0230_on_spring_forward_fires_once_at_0330() -> None:
    cal = calendar(timezone="America/New_York", daily={"at": "02:30"}, start="2026-03-07", count=3)
    found = occurrences(cal)
    assert [o.due_at for o in found] == [
        datetime(2026, 3, 7, 7, 30, tzinfo=UTC),  # 02:30 EST
        datetime(2026, 3, 8, 7, 30, tzinfo=UTC),  # 02:30 does not exist: 03:30 EDT
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC),  # 02:30 EDT
    ]
    assert local(found[1], NEW_YORK).isoformat() == "2026-03-08T03:30:00-04:00"


def test_new_york_0130_on_fall_back_fires_once_at_the_first_0130() -> None:
    cal = calendar(timezone="America/New_York", daily={"at": "01:30"}, start="2026-10-31", count=3)
    found = occurrences(cal)
    assert [o.due_at for o in found] == [
        datetime(2026, 10, 31, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),  # 01:30 EDT; 01:30 EST an hour later is skipped
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
    ]
    assert [o.step for o in found] == [1, 2, 3]


def test_fall_back_fire_times_of_the_daemons_trigger_number_consistently() -> None:
    # The daemon's trigger may still fire at the second 01:30: that instant is no occurrence,
    # while the first 01:30 (a time inside the DST fold) is step 2.
    cal = calendar(timezone="America/New_York", daily={"at": "01:30"}, start="2026-10-31", count=3)
    anchor = calendar_anchor(cal, LOADED)
    fired = trigger_times(cal, anchor, anchor)
    steps = {t.astimezone(UTC).isoformat(): calendar_step(cal, anchor, t) for t in fired}
    assert steps == {
        "2026-10-31T05:30:00+00:00": 1,
        "2026-11-01T05:30:00+00:00": 2,
        "2026-11-01T06:30:00+00:00": None,
        "2026-11-02T06:30:00+00:00": 3,
    }


# --- the daemon's trigger and step numbers --------------------------------------------------------

TEN_DAYS = {"timezone": "Asia/Shanghai", "daily": {"at": "09:00"}, "start": "2026-03-01"}


TRIGGER_NOWS: list[tuple[str, datetime, list[int]]] = [
    ("before-start", datetime(2026, 2, 1, tzinfo=SHANGHAI), list(range(1, 11))),
    ("mid-plan", datetime(2026, 3, 4, 12, 0, tzinfo=SHANGHAI), list(range(5, 11))),
    ("on-an-occurrence", datetime(2026, 3, 4, 9, 0, tzinfo=SHANGHAI), list(range(4, 11))),
    ("just-after", datetime(2026, 3, 4, 9, 0, 1, tzinfo=SHANGHAI), list(range(5, 11))),
    # a clock reading inside the occurrence's second must not fire at 09:00:00.5
    (
        "within-the-second",
        datetime(2026, 3, 4, 9, 0, 0, 500_000, tzinfo=SHANGHAI),
        [5, 6, 7, 8, 9, 10],
    ),
    # the daemon's clock is in UTC: 08:00 UTC is 16:00 in Shanghai, after that day's 09:00
    ("utc-clock", datetime(2026, 3, 4, 8, 0, tzinfo=UTC), list(range(5, 11))),
    # 09:00 UTC has the wall-clock time of an occurrence, but is 17:00 in Shanghai
    ("utc-clock-at-0900", datetime(2026, 3, 4, 9, 0, tzinfo=UTC), list(range(5, 11))),
    ("utc-clock-before", datetime(2026, 3, 4, 0, 59, 59, 999_999, tzinfo=UTC), list(range(4, 11))),
    ("new-york-clock", datetime(2026, 3, 3, 20, 30, tzinfo=NEW_YORK), list(range(5, 11))),
    ("last", datetime(2026, 3, 10, 9, 0, tzinfo=SHANGHAI), [10]),
    ("after-last", datetime(2026, 3, 10, 9, 1, tzinfo=SHANGHAI), []),
    ("late", datetime(2027, 1, 1, tzinfo=UTC), []),
]


@pytest.mark.parametrize(
    ("now", "expected_days"), [pytest.param(*case[1:], id=case[0]) for case in TRIGGER_NOWS]
)
def test_calendar_trigger_fires_the_occurrences_from_now_on(
    now: datetime, expected_days: list[int]
) -> None:
    cal = calendar(**TEN_DAYS, count=10)
    anchor = calendar_anchor(cal, LOADED)
    fired = trigger_times(cal, anchor, now)
    assert fired == [o.due_at for o in occurrences(cal, anchor) if o.due_at >= now]
    assert all(t >= now for t in fired)
    assert [t.astimezone(SHANGHAI).day for t in fired] == expected_days
    assert (calendar_trigger(cal, anchor, now) is None) == (expected_days == [])


@pytest.mark.parametrize(
    "rule",
    [
        {"count": 10},
        {"end": "2026-03-10"},
        {"end": "2026-03-31", "count": 10},
    ],
    ids=["count", "end", "count-before-end"],
)
def test_calendar_trigger_is_none_when_the_plan_is_over(rule: dict[str, Any]) -> None:
    cal = calendar(**TEN_DAYS, **rule)
    anchor = calendar_anchor(cal, LOADED)
    assert len(occurrences(cal, anchor)) == 10
    assert calendar_trigger(cal, anchor, datetime(2026, 3, 10, 9, 0, tzinfo=SHANGHAI)) is not None
    assert calendar_trigger(cal, anchor, datetime(2026, 3, 10, 9, 1, tzinfo=SHANGHAI)) is None


STEP_PLANS: dict[str, dict[str, Any]] = {
    "daily-twice": {"daily": {"at": ["08:00", "20:00"]}, "start": "2026-03-01", "count": 12},
    "weekly": {
        "weekly": {"days": ["mon", "thu"], "at": "19:00"},
        "start": "2026-03-01",
        "count": 8,
    },
    "monthly-last": {"monthly": {"day": "last", "at": "09:00"}, "start": "2026-01-15", "count": 6},
    "cron": {"cron": "0 */6 * * *", "start": "2026-03-01T03:00", "count": 10},
    "every": {"every": "90 minutes", "start": "2026-03-01T08:00", "count": 10},
    "ny-fall-back": {
        "timezone": "America/New_York",
        "daily": {"at": ["00:30", "01:30"]},
        "start": "2026-10-30",
        "count": 8,
    },
}


@pytest.mark.parametrize("rule", STEP_PLANS.values(), ids=STEP_PLANS.keys())
def test_calendar_step_numbers_occurrences_like_calendar_occurrences(rule: dict[str, Any]) -> None:
    cal = calendar(**rule)
    anchor = calendar_anchor(cal, LOADED)
    found = occurrences(cal, anchor)
    assert len(found) == cal.count
    for occurrence in found:
        assert calendar_step(cal, anchor, occurrence.due_at) == occurrence.step
        # the same instant in the plan's own zone is the same occurrence
        in_zone = occurrence.due_at.astimezone(ZoneInfo(cal.timezone))
        assert calendar_step(cal, anchor, in_zone) == occurrence.step
        assert calendar_step(cal, anchor, occurrence.due_at + timedelta(minutes=1)) is None
    assert calendar_step(cal, anchor, anchor - timedelta(days=1)) is None
    after_last = found[-1].due_at + (found[-1].due_at - found[-2].due_at)
    assert calendar_step(cal, anchor, after_last) is None


@pytest.mark.parametrize(
    ("now_offset", "first_offset"),
    [(0, 0), (7.3, 10), (10, 10), (123, 125), (195, 195)],
    ids=["at-anchor", "mid-interval", "on-a-tick", "later-re-add", "last"],
)
def test_every_5_seconds_keeps_its_phase_after_a_re_add(
    now_offset: float, first_offset: int
) -> None:
    cal = calendar(every="5 seconds", count=40)
    anchor = datetime(2026, 3, 1, 8, 0, 2, tzinfo=UTC)  # when the plan was first loaded
    now = anchor + timedelta(seconds=now_offset)
    fired = trigger_times(cal, anchor, now)
    offsets = [(t - anchor).total_seconds() for t in fired]
    assert offsets == list(range(first_offset, 200, 5))
    assert [calendar_step(cal, anchor, t) for t in fired] == [o // 5 + 1 for o in offsets]
    assert calendar_trigger(cal, anchor, anchor + timedelta(seconds=195.5)) is None


def test_calendar_anchor_is_the_start_or_the_registration_time() -> None:
    registered = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    with_start = calendar(daily={"at": "09:00"}, start="2026-06-01T08:00")
    without = calendar(daily={"at": "09:00"})
    assert calendar_anchor(with_start, registered) == datetime(2026, 6, 1, 8, 0, tzinfo=SHANGHAI)
    assert calendar_anchor(without, registered) == registered


@pytest.mark.parametrize(
    "registered",
    [
        datetime(2026, 5, 1, 8, 0, 0, 123_456, tzinfo=UTC),  # 16:00 in Shanghai
        datetime(2026, 5, 1, 9, 0, tzinfo=UTC),  # 17:00 in Shanghai
        datetime(2026, 5, 1, 1, 0, 0, 1, tzinfo=UTC),  # a microsecond after 09:00 in Shanghai
    ],
    ids=["utc-afternoon", "utc-0900", "just-after"],
)
def test_without_start_the_first_occurrence_follows_the_first_load(registered: datetime) -> None:
    cal = calendar(daily={"at": "09:00"})
    first = next(calendar_occurrences(cal, calendar_anchor(cal, registered)))
    assert first == Occurrence(1, datetime(2026, 5, 2, 1, 0, tzinfo=UTC))


# --- relative plans -------------------------------------------------------------------------------


def test_weekly_12_times_from_an_enrolment() -> None:
    rule = relative(every="1 week", count=12, at="09:00")
    start = datetime(2026, 3, 2, 14, 30, tzinfo=SHANGHAI)  # enrolled on a Monday afternoon
    found = dues(rule, start, SHANGHAI)
    assert len(found) == 12
    assert found[0] == datetime(2026, 3, 9, 9, 0, tzinfo=SHANGHAI)
    assert all(b - a == timedelta(days=7) for a, b in zip(found, found[1:], strict=False))
    assert all(t.time() == time(9, 0) for t in found)
    assert relative_due(rule, start, SHANGHAI, 12) is None
    assert relative_due(rule, start, SHANGHAI, -1) is None


def test_relative_weekly_keeps_0900_local_for_a_new_york_user() -> None:
    rule = relative(every="1 week", count=40, at="09:00")
    start = datetime(2026, 2, 20, 16, 0, tzinfo=NEW_YORK)  # a Friday
    found = dues(rule, start, NEW_YORK)
    assert len(found) == 40
    assert all(t.time() == time(9, 0) and t.weekday() == 4 for t in found)
    assert [(t.date() - found[0].date()).days for t in found] == list(range(0, 280, 7))
    offsets = [t.utcoffset() for t in found]
    assert offsets[:2] == [EST, EST]  # Feb 27, Mar 6
    assert EDT in offsets and offsets[-1] == EST  # Nov 20 is back on standard time
    assert [t.utcoffset() for t in found if t.date() in (date(2026, 3, 13), date(2026, 11, 6))] == [
        EDT,
        EST,
    ]


def test_relative_without_at_keeps_the_enrolment_wall_time() -> None:
    rule = relative(every="1 day", count=3)
    start = datetime(2026, 3, 7, 10, 15, tzinfo=NEW_YORK)
    assert [t.isoformat() for t in dues(rule, start, NEW_YORK)] == [
        "2026-03-08T10:15:00-04:00",
        "2026-03-09T10:15:00-04:00",
        "2026-03-10T10:15:00-04:00",
    ]


@pytest.mark.parametrize(
    ("enrolled", "first"),
    [
        (time(7, 0), datetime(2026, 3, 1, 8, 0)),
        (time(8, 0), datetime(2026, 3, 1, 8, 0)),
        (time(12, 0), datetime(2026, 3, 1, 20, 0)),
        (time(21, 0), datetime(2026, 3, 2, 8, 0)),
    ],
    ids=["before-both", "at-the-first", "between", "after-both"],
)
def test_first_after_zero_days_skips_the_slots_before_the_enrolment(
    enrolled: time, first: datetime
) -> None:
    rule = relative(every="1 day", count=4, at=["20:00", "08:00"], first_after="0 days")
    start = datetime.combine(date(2026, 3, 1), enrolled, tzinfo=SHANGHAI)
    found = dues(rule, start, SHANGHAI)
    assert len(found) == 4
    assert found[0] == first.replace(tzinfo=SHANGHAI)
    assert all(t >= start for t in found)
    assert [b - a for a, b in zip(found, found[1:], strict=False)] == [timedelta(hours=12)] * 3


@pytest.mark.parametrize(
    ("rule", "expected", "last"),
    [
        ({"every": "1 day", "at": "09:00"}, 30, "2026-03-31T09:00:00+08:00"),
        (
            {"every": "1 day", "at": ["08:00", "20:00"], "first_after": "0 days"},
            60,
            "2026-03-31T08:00:00+08:00",
        ),
        ({"every": "1 week"}, 4, "2026-03-29T12:00:00+08:00"),
        ({"every": "1 day", "count": 10}, 10, "2026-03-11T12:00:00+08:00"),
    ],
    ids=["daily", "twice-daily", "weekly", "count-first"],
)
def test_relative_duration_30_days_stops(rule: dict[str, Any], expected: int, last: str) -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=SHANGHAI)
    found = dues(relative(duration="30 days", **rule), start, SHANGHAI)
    assert len(found) == expected
    assert found[-1].isoformat() == last
    assert found[-1] <= start + timedelta(days=30)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (date(2026, 1, 31), ["2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]),
        (date(2028, 1, 31), ["2028-02-29", "2028-03-31", "2028-04-30", "2028-05-31"]),
        (date(2026, 1, 15), ["2026-02-15", "2026-03-15", "2026-04-15", "2026-05-15"]),
    ],
    ids=["jan-31", "jan-31-leap-year", "mid-month"],
)
def test_monthly_relative_clamps_to_month_end_without_drift(
    start: date, expected: list[str]
) -> None:
    rule = relative(every="1 month", count=4, at="10:00")
    found = dues(rule, datetime.combine(start, time(15, 0), tzinfo=SHANGHAI), SHANGHAI)
    assert [t.date().isoformat() for t in found] == expected
    assert all(t.time() == time(10, 0) for t in found)


def test_monthly_relative_with_first_after_in_months_does_not_drift() -> None:
    rule = relative(every="1 month", count=3, first_after="2 months")
    found = dues(rule, datetime(2026, 12, 31, 9, 0, tzinfo=SHANGHAI), SHANGHAI)
    assert [t.date().isoformat() for t in found] == ["2027-02-28", "2027-03-31", "2027-04-30"]


def test_relative_occurrences_number_steps_from_1() -> None:
    plan = plan_with()  # weekly, 12 times, at 09:00
    start = datetime(2026, 3, 2, 8, 0, tzinfo=SHANGHAI)
    found = list(relative_occurrences(plan, start, SHANGHAI))
    assert [o.step for o in found] == list(range(1, 13))
    assert [o.due_at for o in found] == [
        relative_due(plan.schedule.relative, start, SHANGHAI, i) for i in range(12)
    ]


# --- naive datetimes --------------------------------------------------------------------------

NAIVE = datetime(2026, 3, 1, 9, 0)
AWARE = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
DAILY = calendar(daily={"at": "09:00"}, count=3)
EVERY = calendar(every="5 seconds", count=3)
WEEKLY = relative(every="1 week", count=3)

NAIVE_CALLS: dict[str, Callable[[], object]] = {
    "calendar_anchor": lambda: calendar_anchor(DAILY, NAIVE),
    "calendar_occurrences": lambda: next(calendar_occurrences(DAILY, NAIVE)),
    "calendar_trigger-now": lambda: calendar_trigger(DAILY, AWARE, NAIVE),
    "calendar_trigger-anchor": lambda: calendar_trigger(DAILY, NAIVE, AWARE),
    "calendar_step-fire-time": lambda: calendar_step(DAILY, AWARE, NAIVE),
    "calendar_step-every": lambda: calendar_step(EVERY, AWARE, NAIVE),
    "calendar_step-anchor": lambda: calendar_step(DAILY, NAIVE, AWARE),
    "relative_due": lambda: relative_due(WEEKLY, NAIVE, SHANGHAI, 0),
}


@pytest.mark.parametrize("call", NAIVE_CALLS.values(), ids=NAIVE_CALLS.keys())
def test_naive_datetimes_are_rejected(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError, match="must carry a time zone"):
        call()


# --- rendering ------------------------------------------------------------------------------------


def plan_with(**changes: Any) -> Plan:
    data: dict[str, Any] = {
        "id": "rehab",
        "name": "Knee rehab",
        "category": "medical",
        "consent": "one_time",
        "variables": ["patient"],
        "schedule": {"relative": {"every": "1 week", "count": 12, "at": "09:00"}},
        "template": {"id": "t", "fields": {"thing1": "thing", "thing2": "thing", "date3": "date"}},
        "message": {
            "default": {
                "thing1": "{patient}",
                "thing2": "第{step}/{count}周 {plan_name}",
                "date3": "{date} {time}",
            },
            "steps": {6: {"thing2": "第6周：复查"}},
        },
    }
    data.update(changes)
    return Plan.model_validate(data)


DUE = datetime(2026, 3, 9, 1, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("step", "tz", "expected"),
    [
        (
            1,
            SHANGHAI,
            {"thing1": "王芳", "thing2": "第1/12周 Knee rehab", "date3": "2026-03-09 09:00"},
        ),
        (6, SHANGHAI, {"thing1": "王芳", "thing2": "第6周：复查", "date3": "2026-03-09 09:00"}),
        (
            2,
            NEW_YORK,
            {"thing1": "王芳", "thing2": "第2/12周 Knee rehab", "date3": "2026-03-08 21:00"},
        ),
    ],
    ids=["default", "step-override", "user-zone"],
)
def test_render(step: int, tz: ZoneInfo, expected: dict[str, str]) -> None:
    assert render(plan_with(), step, DUE, tz, "openid-1", {"patient": "王芳"}) == expected


def test_render_builtin_user_and_empty_count() -> None:
    plan = plan_with(
        schedule={"relative": {"every": "1 day", "duration": "30 days"}},
        message={"default": {"thing1": "{user}", "thing2": "[{count}]", "date3": "{date}"}},
    )
    assert render(plan, 1, DUE, SHANGHAI, "openid-1", {}) == {
        "thing1": "openid-1",
        "thing2": "[]",
        "date3": "2026-03-09",
    }


def test_render_without_a_user_variable_raises() -> None:
    with pytest.raises(RenderError, match=r"variable \{patient\} has no value"):
        render(plan_with(), 1, DUE, SHANGHAI, "openid-1", {"hospital": "x"})
