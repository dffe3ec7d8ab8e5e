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
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from scheduler import simulate
from scheduler.cli import main
from scheduler.domain.policy import Policy
from scheduler.planfiles import load_plans
from scheduler.store.postgres import Store

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
        (["--cancels", "weekly:x"], "--cancels 'weekly:x': write RATE, PLAN_ID:RATE or PLAN_ID:"),
        (["--cancels", "weekly:6"], "--cancels weekly:6: a rate is from 0 to 1 (or 0% to 100%)"),
        (["--cancels", "other:1%"], "--cancels other:1%: no plan other among the files"),
        (["--cancels", "weekly:0:0.1"], "--cancels weekly:0:0.1: plan weekly counts its steps"),
        (["--opens", "0.4"], "--opens 0.4: none of the plans' templates has a page"),
        (["--seed", "x"], "--seed: 'x' is not a whole number"),
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


# --- simulated opens and cancellations, and the engagement guard --------------------------------

# A cohort of 60: the guard judges from 40 sends, pauses over 10 %, or at 3x the baseline and 5
# points above it (the defaults, 200 sends and 2 points, are for bigger plans).
SMALL_COHORT = Policy.model_validate(
    {
        "engagement": {
            "min_sends": 40,
            "baseline_min_sends": 40,
            "max_cancellation_rate": "10%",
            "spike_margin": "5%",
        }
    }
)


def weekly_relative(plan_id: str) -> str:
    """Twelve weekly steps from each enrolment, at 09:00, with a page (where opens come from)."""
    return (
        plan_text(plan_id)
        .replace(
            '  calendar:\n    timezone: Asia/Shanghai\n    weekly: {days: [mon], at: "09:00"}',
            '  relative: {every: 1 week, count: 12, at: "09:00"}',
        )
        .replace(f"  id: {plan_id}_tmpl\n", f"  id: {plan_id}_tmpl\n  page: pages/{plan_id}\n")
    )


async def test_a_cancellation_spike_after_step_6_pauses_its_plan_and_not_the_other(
    db_url, tmp_path
):
    folder = write(
        tmp_path / "plans", spiky=weekly_relative("spiky"), steady=weekly_relative("steady")
    )
    loaded, problems = load_plans([folder])
    assert problems == []
    plans = [item.plan for item in loaded]
    end = MONDAY + timedelta(weeks=9)
    audience = simulate.audience(
        plans,
        simulate.parse_consent(None, plans),
        users=60,
        tz="Asia/Shanghai",
        start=MONDAY,
        end=end,
        variables={},
    )
    behaviour = simulate.parse_behaviour("0.5", "0.02,spiky:6:50%", plans)
    report = await simulate.run(
        db_url,
        loaded,
        SMALL_COHORT,
        audience,
        MONDAY,
        end,
        behaviour=behaviour,
        engagement_report=True,
    )
    # Steps 1-6 of the spiky plan went out (users who had cancelled skipped no_consent), then
    # the guard paused it: nothing of steps 7 and 8 is in the ledger. The steady plan ran on.
    assert {p: dict(c) for p, c in report.counts.items()} == {
        "spiky": {SENT: 340, NO_CONSENT: 20},
        "steady": {SENT: 460, NO_CONSENT: 20},
    }
    assert {p: dict(c) for p, c in report.reacted.items()} == {
        "spiky": {"open": 165, "cancel": 37},
        "steady": {"open": 221, "cancel": 6},
    }
    [pause] = report.pauses
    step_6 = MONDAY + timedelta(weeks=6, hours=9)  # Monday 2027-01-18 09:00 Shanghai
    assert (pause.plan, pause.at, pause.rule) == ("spiky", step_6 + timedelta(minutes=25), "limit")
    assert pause.reason == (
        "engagement guard: cancellations 11.1 % of 54 sends in 24 hours, baseline 1.8 % of 55 "
        "sends in the 7 days before: over the 10.0 % limit; most after step 6 (version 1): 6 of "
        "54 (11.1 %). Check the content, then resume the plan"
    )
    assert {k: pause.details[k] for k in ("sent", "cancelled", "baseline_sent")} == {
        "sent": 54,
        "cancelled": 6,
        "baseline_sent": 55,
    }
    assert (pause.held_back, pause.held_steps, pause.held_users) == (120, (7, 8), 60)
    # The first sweep at which step 6's cancellations were over 10 %: by 09:20 three had come
    # (5.6 %, under the limit, and no spike: +3.7 points over the baseline, not 5), by 09:25 six.
    got_6 = [u for u, rows in report.timeline.items() if ("spiky", 6, "sent") in rows_of(rows)]
    came = sorted(
        at
        for u in got_6
        for at, what in behaviour.reactions("spiky", 6, u, step_6)
        if what == "cancel"
    )
    assert len(got_6) == 54
    by = [sum(at <= step_6 + timedelta(minutes=m) for at in came) for m in (20, 25)]
    assert by == [3, 6]
    assert min(at for at in came if at > step_6 + timedelta(minutes=20)) == pause.at
    async with Store.open(db_url) as store:
        assert (await store.status.plan("spiky"))["state"] == "paused"
        assert (await store.status.plan("steady"))["state"] == "active"
    # `--report`: what `reminders report spiky` says, from the same attribution as the guard's.
    assert simulate.render_engagement(report)[1].splitlines()[1:] == [
        "VERSION  STEP  SENT  DELIVERED  OPENED    CTR  CANCELLED  CANC%  FLAG",
        "1        1       60          0      27  45.0%          2   3.3%",
        "1        2       58          0      27  46.6%          1   1.7%",
        "1        3       57          0      29  50.9%          1   1.8%",
        "1        4       56          0      28  50.0%          1   1.8%",
        "1        5       55          0      30  54.5%          1   1.8%",
        "1        6       54          0      24  44.4%         31  57.4%",
        "total           340          0     165  48.5%         37  10.9%",
    ]
    steady = report.engagement["steady"]["total"]
    assert (steady["sent"], steady["opened"], steady["cancelled"]) == (460, 221, 6)
    text = simulate.render(report)
    assert "engagement guard (126 checks, one at every moment): paused spiky" in text
    at = text.index("  spiky PAUSED at 2027-01-18 Mon 09:25+08:00 (rule limit):\n")
    assert text[at:].splitlines()[1:3] == [
        f"    {pause.reason}",
        "    held back until the end: steps 7-8 of 60 enrolments, 120 in all (not in the ledger: "
        "a resume records them skipped:paused, or catches up)",
    ]
    guard = simulate.as_json(report)["guard"]
    assert guard["checks"] == 126
    assert [(p["plan"], p["at"], p["rule"]) for p in guard["pauses"]] == [
        ("spiky", "2027-01-18T01:25:00+00:00", "limit")
    ]


def rows_of(rows: list[simulate.Line]) -> set[tuple[str, int, str]]:
    return {(row.plan, row.step, row.status) for row in rows}


def test_opens_cancels_and_report_in_the_command(tmp_path, pg_url, monkeypatch, capsys):
    write(tmp_path, rehab=weekly_relative("rehab"))
    monkeypatch.setenv("DATABASE_URL", pg_url)
    args = ["simulate", str(tmp_path / "rehab.yaml"), "--users", "3", "--weeks", "3"]
    args += ["--opens", "100%", "--cancels", "rehab:2:0", "--seed", "7", "--report", "--json"]
    assert main([*args, "--start", "2026-12-07T00:00+08:00"]) == 0
    report = json.loads(capsys.readouterr().out)

    assert report["counts"] == {"rehab": {"sent": 6}}  # steps 1 and 2 of 3 users
    assert report["behaviour"] == {
        "seed": 7,
        "opens": {"plans": {"rehab": 1.0}, "steps": []},
        "cancels": {"plans": {}, "steps": [{"plan": "rehab", "step": 2, "rate": 0.0}]},
        "reported": {"rehab": {"open": 6}},
    }
    assert report["guard"]["pauses"] == []
    rows = report["engagement"]["rehab"]["rows"]
    assert [(r["step"], r["sent"], r["opened"], r["cancelled"]) for r in rows] == [
        (1, 3, 3, 0),
        (2, 3, 3, 0),
    ]


def test_a_steps_rate_wins_over_its_plans_and_that_over_the_unnamed_one(tmp_path):
    folder = write(
        tmp_path / "plans", spiky=weekly_relative("spiky"), steady=weekly_relative("steady")
    )
    plans = [item.plan for item in load_plans([folder])[0]]
    rates = simulate.parse_rates("--cancels", "0.01, spiky:5%, spiky:6:0.5", plans)
    assert [rates.of("spiky", n) for n in (5, 6)] == [Fraction(1, 20), Fraction(1, 2)]
    assert rates.of("steady", 6) == Fraction(1, 100)
    assert rates.describe() == "spiky 5.0 %, steady 1.0 %, spiky step 6 50.0 %"
    # The same seed draws the same users at the same delays; another seed others.
    one, other = simulate.Behaviour(cancels=rates), simulate.Behaviour(cancels=rates, seed=2)
    at = MONDAY + timedelta(weeks=6, hours=9)
    drawn = [one.reactions("spiky", 6, f"o-sim-{n}", at) for n in range(1, 201)]
    assert drawn == [one.reactions("spiky", 6, f"o-sim-{n}", at) for n in range(1, 201)]
    assert drawn != [other.reactions("spiky", 6, f"o-sim-{n}", at) for n in range(1, 201)]
    delays = {when - at for reacted in drawn for when, _ in reacted}
    assert min(delays) >= timedelta(minutes=5) and max(delays) <= timedelta(hours=2)
    assert sum(map(len, drawn)) == 98  # of 200, at 50 %
