"""`reminders simulate`: plan files for simulated users, in virtual time, through the real gate.

The engine is `scheduler.simulate`; this module reads the arguments (every mistake one line) and
prints the report. The run takes a database of its own: a scratch database on DATABASE_URL's
server, created and dropped, or a throwaway embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from scheduler.cli.common import UsageError, adapt_notes, aware, pairs, zone

MAX_USERS = 1000
MAX_WEEKS = 104


def _count(text: str, what: str, most: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise UsageError(f"{what}: {text!r} is not a whole number from 1 to {most}")
    return value


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--seed: {text!r} is not a whole number") from None


def cmd_simulate(args: argparse.Namespace) -> int:
    from scheduler import simulate
    from scheduler.domain.enrolment import default_zone
    from scheduler.errors import PlanError
    from scheduler.planfiles import check_plans, load_policy, policy_file_for
    from scheduler.settings import load_settings

    users = _count(args.users, "--users", MAX_USERS)
    weeks = _count(args.weeks, "--weeks", MAX_WEEKS)
    lines = _count(args.lines, "--lines", 10_000)
    paths = [Path(p) for p in args.plan_files]
    start = aware(args.start, "--start") if args.start else None
    policy_file = Path(args.policy) if args.policy else policy_file_for(paths[0])
    # What the daemon would refuse to load (`reminders validate`) is refused here too.
    checked = check_plans(paths, start or datetime.now(UTC), policy_file)
    if checked.problems:
        raise PlanError(checked.problems)
    if not checked.plans:
        raise UsageError("no plan files found in " + ", ".join(args.plan_files))
    plans = [item.plan for item in checked.plans]
    start = start or simulate.default_start(plans, datetime.now(UTC))
    end = start + timedelta(weeks=weeks)
    tz = zone(args.tz).key if args.tz else default_zone(plans[0])
    audience = simulate.audience(
        plans,
        simulate.parse_consent(args.consent, plans),
        users=users,
        tz=tz,
        start=start,
        end=end,
        variables=dict(pairs(args.var)),
    )
    activity, patterns = simulate.simulated_activity(args.activity, audience, start, end)
    seed = _seed(args.seed)
    behaviour = simulate.parse_behaviour(args.opens, args.cancels, plans, seed)
    policy = load_policy(policy_file)

    async def work(url: str) -> simulate.Report:
        return await simulate.run(
            url,
            checked.plans,
            policy,
            audience,
            start,
            end,
            activity=activity,
            behaviour=behaviour,
            engagement_report=args.report,
        )

    # A pause is in the report, with its reason: the guard's error log line would say it twice.
    guard_log = logging.getLogger("scheduler.app.engagement_guard")
    level = guard_log.level
    guard_log.setLevel(logging.CRITICAL)
    try:
        report = simulate.on_scratch_database(load_settings().database_url, work)
    finally:
        guard_log.setLevel(level)
    if activity:
        active = ", ".join(f"{user} {pattern}" for user, pattern in patterns.items())
        notes = [f"reported active: {active}; the other users: nothing (--activity)"]
    else:  # simulated users report no opens or activity: adapt rules never match them
        notes = [note for plan in plans for note in adapt_notes(plan)]
    if args.json:
        print(
            json.dumps({**simulate.as_json(report), "notes": notes}, ensure_ascii=False, indent=2)
        )
    else:
        print(simulate.render(report, lines=lines))
        for note in notes:
            print(f"note: {note}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="run plan files for simulated users in virtual time through the real gate",
        description="Run plan files for simulated users through the real gate (policy, consent, "
        "caps, quiet hours) in virtual time, on a throwaway database, and report what would "
        "happen. See docs/plans.md, 'Trying a plan: reminders simulate'.",
    )
    p.add_argument("plan_files", nargs="+", metavar="PLAN_FILE", help="plan files or folders")
    p.add_argument("--users", default="3", metavar="N", help="simulated users (default 3)")
    p.add_argument("--weeks", default="6", metavar="W", help="weeks of virtual time (default 6)")
    p.add_argument(
        "--consent",
        metavar="SPEC",
        help="what the users consented to: long_term, one_time:N (N credits each) or none, "
        "optionally PLAN_ID=..., comma-separated (default: every step covered)",
    )
    p.add_argument(
        "--opens",
        metavar="SPEC",
        help="share of sends opened 5-60 min after: RATE, PLAN_ID:RATE or PLAN_ID:STEP:RATE "
        "(0.4 or 40%%), comma-separated (default: none)",
    )
    p.add_argument(
        "--cancels",
        metavar="SPEC",
        help="share of a step's receivers who switch its template off in the settings 5-120 min "
        "after, same syntax as --opens (default: none)",
    )
    p.add_argument(
        "--seed",
        default="1",  # scheduler.simulate.DEFAULT_SEED (not imported to build the parser)
        metavar="N",
        help="which users open and cancel, and when (default %(default)s: the same every run)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="end with each plan's engagement report by step (`reminders report PLAN`)",
    )
    p.add_argument(
        "--start",
        metavar="ISO",
        help="start, with a UTC offset (default: the earliest calendar start of the plans, "
        "else the next Monday 00:00 in the first plan's zone)",
    )
    p.add_argument(
        "--activity",
        metavar="SPEC",
        help="what the users are reported doing, for adapt rules: daily:N (the next N users "
        "active every day at 20:00), once:N (on the first day only), comma-separated "
        "(default: nothing reported)",
    )
    p.add_argument("--tz", help="the users' time zone (default: the first plan's)")
    p.add_argument("--var", action="append", metavar="KEY=VALUE", help="a variable, all users")
    p.add_argument("--lines", default="8", metavar="N", help="timeline rows shown per user")
    p.add_argument("--policy", help="policy file (default: policy.yaml next to the first plan)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_simulate)
