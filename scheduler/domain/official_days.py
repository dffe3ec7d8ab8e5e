"""Countries' official calendars: statutory holidays and the adjusted working days (调休).

China's come from `chinesecalendar`, which follows the State Council's notice for each year,
published late in the year before: a Saturday can be a working day, and a holiday week can
cover a Monday to a Wednesday. For a day in a year the package does not know yet the fallback
is plain: Monday to Friday are working days, and no day is a holiday. `unknown_years` names the
years that fall back, so `validate` and `status` can say so (upgrade the package once the notice
is out).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from importlib.metadata import version

import chinese_calendar
from chinese_calendar import constants as _cn

COUNTRIES = ("CN",)
_CN_YEARS = range(
    min(d.year for d in _cn.holidays), max(max(d.year for d in _cn.holidays), 2004) + 1
)


@dataclass(frozen=True)
class Day:
    working: bool  # an official working day
    holiday: str | None  # the statutory holiday it belongs to (None: none, or a weekend)
    known: bool  # False: the year is not published yet, the fallback applied


def official_day(country: str, day: date) -> Day:
    if country != "CN":
        raise ValueError(f"no official calendar for {country!r} (known: {', '.join(COUNTRIES)})")
    if day.year not in _CN_YEARS:
        return Day(working=day.weekday() < 5, holiday=None, known=False)
    off, name = chinese_calendar.get_holiday_detail(day)
    return Day(working=not off, holiday=name if off else None, known=True)


def unknown_years(country: str, first: date, last: date) -> list[int]:
    """The years in [first, last] the country's calendar does not know yet."""
    return [y for y in range(first.year, last.year + 1) if y not in _CN_YEARS]


def source(country: str) -> str:
    """Where the calendar comes from, for messages."""
    return (
        f"chinesecalendar {version('chinesecalendar')}, which knows"
        f" {_CN_YEARS.start}-{_CN_YEARS.stop - 1}"
    )
