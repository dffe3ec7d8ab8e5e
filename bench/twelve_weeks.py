"""Twelve virtual weeks of the example plans through the real gate, and the ledger's count per rule.

    .venv/bin/python bench/twelve_weeks.py            # a throwaway embedded PostgreSQL
    DATABASE_URL=postgresql://... .venv/bin/python bench/twelve_weeks.py   # a scratch database

Every plan in plans/ runs from 2026-12-01 00:00 (Asia/Shanghai) for 12 weeks under
plans/policy.yaml through `scheduler.simulate` (the engine of `reminders simulate`): the real
`Dispatcher` and `Store` against an in-process fake WeChat; only the clock is virtual, moving from
event to event (see that module). This file holds the scenario and prints its figures.

The audience (`AUDIENCE`) is eight users chosen so that every rule the example plans can meet
stops something: the daily cap of 2 across plans, quiet hours in New York and London (deferred,
then sent), one-time credits running out, a missing long-term consent, an opt-out, and enrolment
variables that break a content rule and a template field rule. The example plans cannot reach the
per-category weekly caps (policy.yaml's exceptions fit their schedules exactly), have no per-plan
caps and no finance plan (no limit key), and their quiet-hours waits (at most 10 h) are all within
max_delay (12 h): those rules stop nothing here (tests/unit and tests/integration cover them).

Rows still pending or deferred at the end are listed. As the scheduler stands, the deferred sends
of a calendar plan's last occurrence stay deferred for good: that fan-out marks the plan
`completed`, and `retry_deferred` (and the claim) only take an active plan's rows.

The last line is machine-readable:

    weeks=12 sent=N skipped_capped=N skipped_quiet_hours=N deferred_then_sent=N no_consent=N ...
"""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.planfiles import load_plans, load_policy  # noqa: E402
from scheduler.simulate import (  # noqa: E402
    Member,
    Report,
    User,
    label,
    on_scratch_database,
    render_left,
    render_table,
    run,
)

SHANGHAI = ZoneInfo("Asia/Shanghai")
WEEKS = 12
START = datetime(2026, 12, 1, tzinfo=SHANGHAI).astimezone(UTC)
END = START + timedelta(weeks=WEEKS)  # exclusive: 2027-02-23 00:00 Shanghai
PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"
# 21 characters: over the 20 a `thing` field allows (rehab-weekly's thing1 is "{patient}").
LONG_PATIENT = "欧阳娜娜（北京协和医院骨科三病区第十二床）"


# --- the audience -------------------------------------------------------------------------------


AUDIENCE: tuple[User, ...] = (
    User(
        "o-alice",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("course-fridays"),
        ),
        "three plans in Shanghai: on December weekdays commute 07:30 and practice 08:00 fill the "
        "day, so practice 20:00 (and course 19:00 on Fridays) is capped",
    ),
    User(
        "o-bob",
        "America/New_York",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("course-fridays"),
        ),
        "the same three plans from New York (13 h behind): practice 20:00 and course 19:00 "
        "(Shanghai) fall at 07:00 and 06:00 local, inside quiet hours: deferred to 08:00, sent",
    ),
    User(
        "o-carol",
        "Europe/London",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("pension-monthly", variables={"name": "Carol Evans"}),
        ),
        "London (8 h behind): commute 07:30 is 23:30 local (transport quiet hours, deferred to "
        "06:00), practice 08:00 is midnight and pension 09:00 is 01:00 (deferred to 08:00)",
    ),
    User(
        "o-dave",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=10),
            Member(
                "rehab-weekly",
                credits=4,
                variables={"patient": "王强", "hospital": "协和"},
                start=datetime(2026, 11, 30, 10, tzinfo=SHANGHAI),
            ),
        ),
        "one-time credits run out: 10 for practice, 4 for rehab (then no_consent); rehab on "
        "Mondays 09:00 is capped while commute and practice still take the day",
    ),
    User(
        "o-erin",
        "Asia/Shanghai",
        (
            Member(
                "rehab-weekly",
                credits=12,
                variables={"patient": LONG_PATIENT, "hospital": "协和"},
                start=datetime(2026, 11, 29, 10, tzinfo=SHANGHAI),
            ),
            Member("pension-monthly", variables={"name": "李娜"}),
        ),
        "a patient name of 21 characters in rehab's thing1 (at most 20): every step skipped by the "
        "field rule, no credit taken",
    ),
    User(
        "o-frank",
        "Asia/Shanghai",
        (
            Member("pension-monthly", variables={"name": "免费领红包"}),
            Member("commute-line2"),
        ),
        "a pension 'name' carrying promotional words (免费领, 红包): the long-term notice is "
        "skipped by the content rule",
    ),
    User(
        "o-grace",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("course-fridays"),
            Member("pension-monthly", variables={"name": "赵敏"}),
        ),
        "opts out of every plan on 2026-12-24 12:00 Shanghai: later sends are skipped opted_out",
    ),
    User(
        "o-heidi",
        "America/New_York",
        (
            Member(
                "rehab-weekly",
                credits=12,
                variables={"patient": "Heidi Park", "hospital": "NYU Langone"},
                start=datetime(2026, 11, 30, 10, tzinfo=ZoneInfo("America/New_York")),
            ),
            Member("course-fridays", long_term=False),
            Member("pension-monthly", variables={"name": "Heidi Park"}),
        ),
        "rehab at 09:00 New York time (the user's own zone); never accepted the course's "
        "long-term template: no_consent every Friday",
    ),
)

# (when, user, reason): opt-outs of every plan, applied at the first step at or after `when`.
OPT_OUTS: tuple[tuple[datetime, str, str], ...] = (
    (datetime(2026, 12, 24, 12, tzinfo=SHANGHAI).astimezone(UTC), "o-grace", "asked to stop"),
)


# --- the run ------------------------------------------------------------------------------------


async def run_scenario(url: str) -> Report:
    """The 12 weeks on an empty database at `url`; the ledger's counts per plan."""
    loaded, problems = load_plans([PLANS_DIR])
    if problems:
        raise RuntimeError(f"the example plans do not load: {problems}")
    return await run(url, loaded, load_policy(PLANS_DIR), AUDIENCE, START, END, OPT_OUTS)


# --- the report ---------------------------------------------------------------------------------


def summary_line(report: Report) -> str:
    total = report.total()
    known = {
        "sent": ("sent", None),
        "failed": ("failed", None),
        "skipped_capped": ("skipped", "capped"),
        "skipped_quiet_hours": ("skipped", "quiet_hours"),
        "skipped_content": ("skipped", "content"),
        "skipped_field": ("skipped", "field"),
        "skipped_category": ("skipped", "category"),
        "no_consent": ("skipped", "no_consent"),
        "opted_out": ("skipped", "opted_out"),
        "defer_expired": ("skipped", "defer_expired"),
        "deferred_left": ("deferred", "quiet_hours"),
    }
    parts = [f"weeks={WEEKS}"]
    for name, key in known.items():
        parts.append(f"{name}={total[key]}")
        if name == "skipped_quiet_hours":
            parts.append(f"deferred_then_sent={report.deferred_then('sent')}")
    others = sorted(set(total) - set(known.values()), key=lambda k: (k[0], k[1] or ""))
    parts += [f"{label(k).replace(':', '_')}={total[k]}" for k in others]
    deferred_ever = sum(sum(c.values()) for c in report.deferred_fate.values())
    parts += [
        f"deferred_ever={deferred_ever}",
        f"deferred_then_capped={report.deferred_then('skipped', 'capped')}",
        f"rows={sum(total.values())}",
        f"max_per_user_day={report.most_per_local_day()}",
        f"steps={report.steps}",
        f"seconds={report.seconds:.1f}",
    ]
    return " ".join(parts)


def render(report: Report) -> str:
    lines = [
        f"{WEEKS} virtual weeks from {START.astimezone(SHANGHAI):%Y-%m-%d %H:%M} Asia/Shanghai: "
        f"{len(AUDIENCE)} users, {report.steps} steps ({report.fires} calendar fires, "
        f"{report.sweeps} sweeps, {report.retries} deferred retries), {report.seconds:.1f} s",
        "",
        "ledger rows per plan by (status:reason); deferred→sent: rows deferred at first that went "
        "out later",
        render_table(report),
    ]
    lines += render_left(report)
    lines += ["", f"most sends to one user on one local day: {report.most_per_local_day()}"]
    lines.append(summary_line(report))
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------


def main() -> None:
    # A scratch database on DATABASE_URL's server, else a throwaway embedded PostgreSQL.
    print(render(on_scratch_database(os.environ.get("DATABASE_URL") or None, run_scenario)))


if __name__ == "__main__":
    main()
