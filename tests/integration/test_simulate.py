"""`reminders simulate`: plan files through the real gate in virtual time, counts checked exactly.

The engine (`scheduler.simulate.run`) runs on the suite's fresh database; the command runs
in-process and once as a process, on a scratch database of the suite's server (DATABASE_URL).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from scheduler import simulate
from scheduler.cli import main
from scheduler.domain.policy import Policy
from scheduler.planfiles import load_plans

SHANGHAI = ZoneInfo("Asia/Shanghai")
LONDON = ZoneInfo("Europe/London")
MONDAY = datetime(2026, 12, 7, tzinfo=SHANGHAI)  # 2026-12-07 is a Monday

SENT = ("sent", None)
NO_CONSENT = ("skipped", "no_consent")
QUIET = ("skipped", "quiet_hours")
CAPPED = ("skipped", "capped")


def plan_text(
    plan_id: str,
    *,
    category: str = "medical",
    consent: str = "one_time",
    day: str = "mon",
    at: str = '"09:00"',
    extra: str = "",
) -> str:
    """A weekly calendar plan in Shanghai that passes `reminders validate` by itself."""
    return f"""\
id: {plan_id}
name: {plan_id}
category: {category}
consent: {consent}
schedule:
  calendar:
    timezone: Asia/Shanghai
    weekly: {{days: [{day}], at: {at}}}
{extra}template:
  id: {plan_id}_tmpl
  fields: {{thing1: thing, thing4: thing}}
message:
  default: {{thing1: "第{{step}}周提示", thing4: "仅供参考，不构成诊断"}}
"""


def write(folder: Path, **plans: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in plans.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


async def run(
    db_url: str,
    folder: Path,
    *,
    users: int,
    weeks: int,
    consent: str | None = None,
    tz: str = "Asia/Shanghai",
) -> simulate.Report:
    loaded, problems = load_plans([folder])
    assert problems == []
    plans = [item.plan for item in loaded]
    end = MONDAY + timedelta(weeks=weeks)
    audience = simulate.audience(
        plans,
        simulate.parse_consent(consent, plans),
        users=users,
        tz=tz,
        start=MONDAY,
        end=end,
        variables={},
    )
    return await simulate.run(db_url, loaded, Policy(), audience, MONDAY, end)


def outcomes(report: simulate.Report, user: str) -> list[tuple[str, int, str | None]]:
    return [(row.status, row.step, row.reason) for row in report.timeline[user]]


async def test_three_credits_of_a_weekly_plan_run_dry_after_step_3(db_url, tmp_path):
    folder = write(tmp_path / "plans", weekly=plan_text("weekly"))
    report = await run(db_url, folder, users=2, weeks=6, consent="one_time:3")

    assert {p: dict(c) for p, c in report.counts.items()} == {"weekly": {SENT: 6, NO_CONSENT: 6}}
    step = [MONDAY + timedelta(weeks=n, hours=9) for n in range(6)]  # steps 1-6, Mondays 09:00
    for user in ("o-sim-1", "o-sim-2"):
        assert outcomes(report, user) == [
            ("sent", 1, None),
            ("sent", 2, None),
            ("sent", 3, None),
            ("skipped", 4, "no_consent"),
            ("skipped", 5, "no_consent"),
            ("skipped", 6, "no_consent"),
        ]
        assert [row.at for row in report.timeline[user]] == step
        # 3 of the upcoming steps covered at the start; warned as step 3 went out, a week
        # before step 4 was skipped.
        assert report.runway[("weekly", user)] == simulate.Runway(
            covered=3, dry_step=4, warned_at=step[2], warned_step=4, warned_due=step[3]
        )
    assert len(report.sends) == 6
    assert report.left == []


async def test_quiet_hours_in_the_users_zone_defer_or_skip(db_url, tmp_path):
    # 09:00 Shanghai is 01:00 in London: inside the 22:00-08:00 quiet hours of the user's zone.
    folder = write(
        tmp_path / "plans",
        defer=plan_text("defer", consent="long_term", category="government"),
        skip=plan_text(
            "skip",
            consent="long_term",
            category="government",
            day="tue",
            extra="delivery: {on_quiet_hours: skip}\n",
        ),
    )
    report = await run(db_url, folder, users=1, weeks=3, tz="Europe/London")

    assert {p: dict(c) for p, c in report.counts.items()} == {
        "defer": {SENT: 3},
        "skip": {QUIET: 3},
    }
    assert {p: dict(c) for p, c in report.deferred_fate.items()} == {"defer": {SENT: 3}}
    deferred = [row for row in report.timeline["o-sim-1"] if row.plan == "defer"]
    assert [(row.deferred, row.at.astimezone(LONDON).strftime("%a %H:%M")) for row in deferred] == [
        ("quiet_hours", "Mon 08:00")
    ] * 3
    assert all(way.dry_step is None for way in report.runway.values())  # long-term: covered


async def test_the_daily_cap_across_plans_skips_the_third_send(db_url, tmp_path):
    folder = write(
        tmp_path / "plans",
        lessons=plan_text(
            "lessons", category="education", consent="long_term", at='["09:00", "12:00"]'
        ),
        evening=plan_text("evening", at='"18:00"'),
    )
    report = await run(db_url, folder, users=1, weeks=2, consent="evening=one_time:1")

    assert {p: dict(c) for p, c in report.counts.items()} == {
        "lessons": {SENT: 4},
        "evening": {CAPPED: 2},
    }
    # A capped send takes no credit: the runway still covers the first evening step.
    assert report.runway[("evening", "o-sim-1")].covered == 1
    assert report.runway[("evening", "o-sim-1")].warned_at is None
    assert report.most_per_local_day() == 2


def test_json_output_of_a_relative_plan_covered_by_default(tmp_path, pg_url, monkeypatch, capsys):
    plan = tmp_path / "rehab.yaml"
    plan.write_text(
        plan_text("rehab", extra="").replace(
            '  calendar:\n    timezone: Asia/Shanghai\n    weekly: {days: [mon], at: "09:00"}',
            '  relative: {every: 1 week, count: 4, at: "09:00"}',
        ),
        encoding="utf-8",
    )
    monkeypatch.setenv("DATABASE_URL", pg_url)
    args = ["simulate", str(plan), "--users", "2", "--weeks", "6", "--json"]
    assert main([*args, "--start", "2026-12-07T00:00+08:00"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["counts"] == {"rehab": {"sent": 4 * 2}}
    assert report["start"] == "2026-12-06T16:00:00+00:00"
    # Without --consent every step is covered: 4 credits each, one per step.
    assert [(r["user"], r["covered"], r["dry_step"]) for r in report["runway"]] == [
        ("o-sim-1", None, None),
        ("o-sim-2", None, None),
    ]
    timeline = report["timeline"]["o-sim-1"]
    assert [(row["step"], row["outcome"]) for row in timeline] == [
        (n, "sent") for n in (1, 2, 3, 4)
    ]
    assert timeline[0]["at"] == "2026-12-14T01:00:00+00:00"  # a week after the start, 09:00


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--consent", "one_time=3"], "--consent 'one_time=3': write long_term, one_time:N or"),
        (["--consent", "long_term"], "--consent long_term: none of the plans is long_term"),
        (["--consent", "other=none"], "--consent other=none: no plan other among the files"),
        (["--start", "2026-12-07T00:00"], "--start: '2026-12-07T00:00' needs a UTC offset"),
        (["--users", "many"], "--users: 'many' is not a whole number from 1 to 1000"),
        (["--tz", "Mars/Base"], "--tz: 'Mars/Base' is not an IANA time zone"),
        (["--var", "nope=1"], "--var nope: no plan declares it"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_1(tmp_path, capsys, args, says):
    write(tmp_path, weekly=plan_text("weekly"))
    assert main(["simulate", str(tmp_path / "weekly.yaml"), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"reminders: {says}"), err
    assert err.count("\n") == 1


def test_a_bad_plan_file_is_named_with_its_field(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(plan_text("bad", category="astrology"), encoding="utf-8")
    assert main(["simulate", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error  {tmp_path / 'bad.yaml'}: category: "), err
    assert err.count("\n") == 1


def test_the_command_as_a_process(tmp_path, pg_url):
    write(tmp_path, weekly=plan_text("weekly"))
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "simulate", str(tmp_path / "weekly.yaml")]
        + ["--users", "2", "--consent", "one_time:3", "--start", "2026-12-07T00:00+08:00"],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": pg_url},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].startswith("2026-12-07 Mon 00:00+08:00 to 2027-01-18 Mon 00:00+08:00")
    assert Counter(line.split()[:3] == ["weekly", "6", "6"] for line in lines)[True] == 1
    assert "  weekly  2 users: covers 3 steps from the start; step 4 is not covered" in lines
    assert (
        "            warned 2026-12-21 Mon 09:00+08:00: step 4 (2026-12-28 Mon 09:00+08:00) "
        "will be skipped no_consent, ask again"
    ) in lines
    assert "o-sim-1 and 1 more (Asia/Shanghai): first 6 of 6 ledger rows" in lines
    assert "  (the same for o-sim-2)" in lines
