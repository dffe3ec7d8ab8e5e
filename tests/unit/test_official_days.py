"""Calendars people live by: China's official working days and holidays (chinesecalendar), extra
and excepted dates, months without the monthly day; the warnings and what preview shows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from itertools import islice
from pathlib import Path
from zoneinfo import ZoneInfo

from apscheduler._marshalling import marshal_object, unmarshal_object
from apscheduler.serializers.json import JSONSerializer

from scheduler.cli import main
from scheduler.domain.official_days import official_day
from scheduler.domain.plan import Calendar
from scheduler.domain.schedule import (
    calendar_anchor,
    calendar_occurrences,
    calendar_step,
    calendar_trigger,
    schedule_warnings,
    skipped_days,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = datetime(2026, 9, 1, tzinfo=UTC)


def calendar(**rule) -> Calendar:
    return Calendar.model_validate({"timezone": "Asia/Shanghai", **rule})


def local_days(cal: Calendar, until: date) -> list[str]:
    days = []
    for occurrence in calendar_occurrences(cal, calendar_anchor(cal, NOW)):
        local = occurrence.due_at.astimezone(SHANGHAI)
        if local.date() > until:
            break
        days.append(local.strftime("%m-%d %a %H:%M"))
    return days


def test_workdays_skip_national_day_2026_and_work_the_adjusted_saturday():
    cal = calendar(workdays={"at": "07:30", "calendar": "CN"}, start="2026-09-28")
    assert local_days(cal, date(2026, 10, 13)) == [
        "09-28 Mon 07:30",
        "09-29 Tue 07:30",
        "09-30 Wed 07:30",  # Oct 1-7: National Day
        "10-08 Thu 07:30",
        "10-09 Fri 07:30",
        "10-10 Sat 07:30",  # 调休: China works this Saturday
        "10-12 Mon 07:30",  # and not this Sunday
        "10-13 Tue 07:30",
    ]


def test_skip_holidays_leaves_out_the_holiday_week_of_a_daily_plan_and_keeps_weekends():
    cal = calendar(daily={"at": "20:00"}, skip_holidays="CN", start="2026-09-29")
    assert local_days(cal, date(2026, 10, 11)) == [
        "09-29 Tue 20:00",
        "09-30 Wed 20:00",
        "10-08 Thu 20:00",
        "10-09 Fri 20:00",
        "10-10 Sat 20:00",
        "10-11 Sun 20:00",
    ]


def test_except_and_extra_dates():
    cal = calendar(
        weekly={"days": ["mon"], "at": ["09:00", "18:00"]},
        start="2026-11-02",
        except_dates=["2026-11-09"],
        extra_dates=["2026-11-11", "2026-11-16"],  # a Wednesday, and a Monday it fires on anyway
    )
    assert local_days(cal, date(2026, 11, 16)) == [
        "11-02 Mon 09:00",
        "11-02 Mon 18:00",
        "11-11 Wed 09:00",
        "11-11 Wed 18:00",
        "11-16 Mon 09:00",
        "11-16 Mon 18:00",
    ]


def test_a_year_the_calendar_does_not_know_falls_back_to_monday_to_friday_and_warns():
    assert official_day("CN", date(2027, 10, 1)).known is False
    cal = calendar(workdays={"at": "07:30"}, start="2027-09-27")
    assert local_days(cal, date(2027, 10, 4)) == [
        "09-27 Mon 07:30",
        "09-28 Tue 07:30",
        "09-29 Wed 07:30",
        "09-30 Thu 07:30",
        "10-01 Fri 07:30",  # National Day 2027 is not published yet: the fallback applies
        "10-04 Mon 07:30",
    ]
    [warning] = schedule_warnings(cal, calendar_anchor(cal, NOW))
    assert "does not know 2027" in warning and "Monday to Friday" in warning
    known = calendar(workdays={"at": "07:30"}, start="2026-09-01", end="2026-12-31")
    assert schedule_warnings(known, calendar_anchor(known, NOW)) == []


def test_skipped_days_say_why():
    cal = calendar(workdays={"at": "07:30"}, start="2026-09-30", except_dates=["2026-10-09"])
    anchor = calendar_anchor(cal, NOW)
    skipped = skipped_days(cal, anchor, anchor + timedelta(days=14))
    assert [(t.astimezone(SHANGHAI).strftime("%m-%d"), why) for t, why in skipped] == [
        *((f"10-0{d}", "National Day") for d in range(1, 8)),
        ("10-09", "except_dates"),  # ordinary weekends go without saying
    ]


def test_the_daemons_trigger_survives_its_json_round_trip_and_numbers_steps_the_same():
    cal = calendar(workdays={"at": "07:30"}, start="2026-09-28", extra_dates=["2026-10-11"])
    anchor = calendar_anchor(cal, NOW)
    trigger = calendar_trigger(cal, anchor, anchor)
    assert trigger is not None
    first = [trigger.next() for _ in range(3)]
    serializer = JSONSerializer()
    restored = unmarshal_object(
        *serializer.deserialize(serializer.serialize(marshal_object(trigger)))
    )
    rest = [restored.next() for _ in range(4)]
    expected = [o.due_at for o in islice(calendar_occurrences(cal, anchor), 7)]
    assert [t.astimezone(UTC) for t in first + rest] == expected
    saturday = datetime(2026, 10, 10, 7, 30, tzinfo=SHANGHAI)
    assert calendar_step(cal, anchor, saturday) == 6
    assert calendar_step(cal, anchor, datetime(2026, 10, 1, 7, 30, tzinfo=SHANGHAI)) is None


def test_day_31_skips_short_months_unless_told_to_use_their_last_day():
    skip = calendar(monthly={"day": 31, "at": "09:00"}, start="2027-01-01", count=12)
    last = calendar(
        monthly={"day": 31, "at": "09:00", "short_months": "last_day"},
        start="2027-01-01",
        count=12,
    )
    months = [
        o.due_at.astimezone(SHANGHAI).strftime("%y-%m-%d")
        for o in calendar_occurrences(skip, calendar_anchor(skip, NOW))
    ]
    assert months[:3] == ["27-01-31", "27-03-31", "27-05-31"] and months[-1] == "28-08-31"
    [warning] = schedule_warnings(skip, calendar_anchor(skip, NOW))
    assert "February, April, June, September and November" in warning
    assert "short_months: last_day" in warning
    moved = [
        o.due_at.astimezone(SHANGHAI).strftime("%m-%d")
        for o in calendar_occurrences(last, calendar_anchor(last, NOW))
    ]
    assert moved == [
        "01-31", "02-28", "03-31", "04-30", "05-31", "06-30",
        "07-31", "08-31", "09-30", "10-31", "11-30", "12-31",
    ]  # fmt: skip
    assert schedule_warnings(last, calendar_anchor(last, NOW)) == []


PLAN = """\
id: commute
name: Line 2 commute alert
category: transport
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    workdays: {at: "07:30", calendar: CN}
    start: %s
    count: 6
template:
  id: tmpl_commute
  fields: {thing1: thing}
message:
  default: {thing1: "Line 2 status"}
"""


def test_preview_shows_the_holiday_week_skipped(tmp_path: Path, capsys):
    plan = tmp_path / "commute.yaml"
    plan.write_text(PLAN % "2026-09-29", encoding="utf-8")
    assert main(["preview", str(plan), "--from", "2026-09-29T00:00+08:00"]) == 0
    out = capsys.readouterr().out
    assert "skipped   2026-10-01  (National Day)" in out
    assert "skipped   2026-10-07  (National Day)" in out
    assert "step   4  2026-10-09T07:30:00+08:00" in out
    assert "step   5  2026-10-10T07:30:00+08:00" in out  # the adjusted Saturday


def test_validate_warns_about_an_unknown_year_and_still_passes(tmp_path: Path, capsys):
    plan = tmp_path / "commute.yaml"
    plan.write_text(PLAN % "2027-03-01", encoding="utf-8")
    assert main(["validate", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "warn   " in out and "does not know 2027" in out


def test_a_cap_error_names_the_first_week_that_breaks_it(tmp_path: Path, capsys):
    plan = tmp_path / "commute.yaml"
    plan.write_text(PLAN.replace("count: 6", "count: 40") % "2026-12-21", encoding="utf-8")
    policy = tmp_path / "strict.yaml"
    policy.write_text("caps:\n  category_week: {transport: 3}\n", encoding="utf-8")
    assert main(["validate", str(plan), "--policy", str(policy)]) == 1
    out = capsys.readouterr().out
    # Five working days in each week from 2026-W52 on: the first is the one named.
    assert "sends 5 messages in week 2026-W52, over the cap of 3 transport" in out
