"""The engagement figures' pure side: rates, sums per grouping and window, the CSV and table
outputs, the report's bounds, and the policy's attribution window."""

from __future__ import annotations

import csv
import io
from datetime import date

import pytest

from scheduler.domain.engagement import (
    Figures,
    Group,
    grouped,
    range_problem,
    ratio,
    to_csv,
    to_table,
    total,
    windows,
    zone_problem,
)
from scheduler.errors import PlanError
from scheduler.planfiles import parse_policy


def group(step: int, day: int, age: int, *counts: int, version: int = 1) -> Group:
    sent, delivered, opened, cancelled = counts
    return Group.from_row(
        {
            "plan_version": version,
            "step": step,
            "variant": None,
            "day": date(2026, 3, day),
            "age": age,
            "sent": sent,
            "delivered": delivered,
            "opened": opened,
            "cancelled": cancelled,
        }
    )


GROUPS = [
    group(1, 1, 0, 10, 9, 4, 1),
    group(2, 8, 7, 10, 10, 2, 0),
    group(2, 9, 1, 5, 5, 1, 2),  # step 2 went out over two days
    group(1, 9, 1, 4, 4, 0, 0, version=2),
]


def test_rates_are_fractions_of_the_sends_and_none_without_sends():
    f = Figures(sent=3, delivered=3, opened=1, cancelled=2)
    assert (f.click_through, f.cancellation_rate) == (0.3333, 0.6667)
    assert Figures().click_through is None and ratio(0, 0) is None
    assert Figures.from_json(f.as_json()) == f


def test_groupings_and_windows_are_sums_of_the_same_deliveries():
    by_step = grouped(GROUPS, "step")
    assert [(line.key, line.figures.sent) for line in by_step] == [
        ({"version": 1, "step": 1}, 10),
        ({"version": 1, "step": 2}, 15),
        ({"version": 2, "step": 1}, 4),
    ]
    by_day = grouped(GROUPS, "day")
    assert [line.key["day"] for line in by_day] == ["2026-03-01", "2026-03-08", "2026-03-09"]
    assert by_day[2].figures == Figures(sent=9, delivered=9, opened=1, cancelled=2)
    assert [line.key for line in grouped(GROUPS, "variant")][0] == {
        "version": 1,
        "step": 1,
        "variant": "default",
    }
    everything = total(g.figures for g in GROUPS)
    for by in ("day", "step", "version", "variant"):
        assert total(line.figures for line in grouped(GROUPS, by)) == everything
    w = windows(GROUPS)
    assert (w["24h"].sent, w["7d"].sent, w["all"].sent) == (9, 19, 29)


def test_csv_has_the_grouping_columns_then_the_figures():
    text = to_csv(grouped(GROUPS, "step") + grouped([], "step"), "step")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == [
        "version",
        "step",
        "sent",
        "delivered",
        "opened",
        "click_through",
        "cancelled",
        "cancellation_rate",
    ]
    assert rows[2] == ["1", "2", "15", "15", "3", "0.2", "2", "0.1333"]
    empty = to_csv(grouped([group(1, 1, 0, 0, 0, 0, 0)], "day"), "day")
    assert empty.splitlines()[1] == "2026-03-01,0,0,0,,0,"


def test_table_aligns_the_columns_and_ends_with_the_total():
    lines = to_table(grouped(GROUPS, "version"), "version", total(g.figures for g in GROUPS))
    rows = [line.split() for line in lines.splitlines()]
    assert rows[0] == ["VERSION", "SENT", "DELIVERED", "OPENED", "CTR", "CANCELLED", "CANC%"]
    assert rows[1] == ["1", "25", "24", "7", "28.0%", "3", "12.0%"]
    assert rows[-1] == ["total", "29", "28", "7", "24.1%", "3", "10.3%"]


@pytest.mark.parametrize(
    ("start", "end", "needle"),
    [
        (date(2026, 3, 5), date(2026, 3, 1), "after"),
        (date(1, 1, 1), None, "between"),
        (None, date(9999, 12, 31), "between"),
    ],
)
def test_report_bounds_are_checked(start, end, needle):
    assert needle in (range_problem(start, end) or "")


def test_good_bounds_and_zones_pass_and_bad_zones_are_named():
    assert range_problem(None, None) is None
    assert range_problem(date(2026, 3, 1), date(2026, 3, 1)) is None
    assert zone_problem("Asia/Shanghai") is None and zone_problem("UTC") is None
    for name in ("Mars/Base", "Asia", "../etc/passwd", "", "a\x00b", "x" * 100):
        assert "IANA" in (zone_problem(name) or ""), name


def test_the_policy_sets_the_attribution_window():
    assert str(parse_policy("", "policy.yaml").engagement.attribution_window) == "72 hours"
    policy = parse_policy("engagement:\n  attribution_window: 3 days\n", "policy.yaml")
    assert policy.engagement.attribution_window.as_timedelta().days == 3
    for bad in ("1 month", "0 hours", "soon"):
        with pytest.raises(PlanError) as caught:
            parse_policy(f"engagement:\n  attribution_window: {bad}\n", "policy.yaml")
        assert caught.value.problems[0].field.startswith("engagement.attribution_window")
