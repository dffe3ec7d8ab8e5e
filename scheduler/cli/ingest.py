"""`reminders enroll` (one user, or a CSV file of many) and `reminders runway`.

CSV import: a header row, then one enrolment per row. Columns: `openid` (or `user`), optional
`start` (ISO date-time; without an offset it is read in the row's time zone) and `tz` (IANA
zone), and one column per plan variable. Good rows are imported in one transaction; bad rows are
reported with their line numbers and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scheduler.cli.common import UsageError, pairs, settings_for, with_store
from scheduler.domain.enrolment import (
    Enrolment,
    EnrolmentError,
    check_variable_names,
    default_zone,
    parse_start,
    prepare,
    zone,
)
from scheduler.domain.plan import Plan
from scheduler.settings import Settings

USER_COLUMNS = ("openid", "user")


@dataclass(frozen=True)
class Rejected:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


def read_csv(
    rows: Iterable[str],
    plan: Plan,
    now: datetime,
    *,
    tz: str | None = None,
    start: str | None = None,
) -> tuple[list[Enrolment], list[Rejected]]:
    """Check every row of an enrolment CSV; `tz`/`start` are defaults for rows without them."""
    reader = csv.reader(rows)
    header = next(reader, None)
    if header is None:
        raise UsageError("the CSV file is empty: it needs a header row (openid,start,tz,...)")
    header = [h.strip() for h in header]
    user_col = next((c for c in USER_COLUMNS if c in header), None)
    if user_col is None:
        raise UsageError(f"the CSV header needs an 'openid' column (found: {', '.join(header)})")
    if len(set(header)) != len(header):
        raise UsageError("the CSV header names a column twice")
    var_cols = [h for h in header if h not in (user_col, "start", "tz")]
    try:
        check_variable_names(plan, set(var_cols), "header")
    except EnrolmentError as exc:
        raise UsageError(f"CSV {exc}") from None
    missing = [v for v in plan.variables if v not in var_cols]
    if missing:
        raise UsageError(f"the CSV needs a column for each plan variable: {', '.join(missing)}")

    default_tz = tz or default_zone(plan)
    index = {h: i for i, h in enumerate(header)}
    good: list[Enrolment] = []
    bad: list[Rejected] = []
    first_line: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue  # blank lines are not rows
        if len(row) != len(header):
            bad.append(Rejected(line, f"{len(row)} fields, the header has {len(header)}"))
            continue
        user = row[index[user_col]].strip()
        if user in first_line:
            bad.append(Rejected(line, f"openid {user} is already on line {first_line[user]}"))
            continue
        try:
            row_tz = (row[index["tz"]].strip() if "tz" in index else "") or default_tz
            start_text = (row[index["start"]].strip() if "start" in index else "") or start
            moment = parse_start(start_text, zone(row_tz)) if start_text else None
            enrolment = prepare(
                plan, user, moment, row_tz, {v: row[index[v]].strip() for v in var_cols}, now
            )
        except EnrolmentError as exc:
            bad.append(Rejected(line, str(exc)))
            continue
        first_line[user] = line
        good.append(enrolment)
    return good, bad


async def _plan_for(store: Any, settings: Settings, plan_id: str) -> Plan:
    from scheduler.planfiles import load_plans

    record = await store.plan(plan_id)
    if record is None:  # not loaded by a daemon yet: take it from the plans folder
        loaded, _ = load_plans([settings.plans_dir])
        match = [i for i in loaded if i.plan.id == plan_id]
        if not match:
            raise UsageError(f"no plan {plan_id!r} in the database or in {settings.plans_dir}/")
        plan = match[0].plan
        registration = await store.register_plan(plan, str(match[0].path))
        record = registration.record
    return Plan.model_validate(record.definition)


def cmd_enroll(args: argparse.Namespace) -> int:

    settings = settings_for(args)

    async def one(store: Any) -> str:
        plan = await _plan_for(store, settings, args.plan_id)
        variables = dict(pairs(args.var))
        missing = [v for v in plan.variables if v not in variables]
        if missing:
            raise UsageError(f"plan {plan.id} needs --var for: {', '.join(missing)}")
        try:
            tz = zone(args.tz or default_zone(plan), "--tz")
            start = parse_start(args.start, tz, "--start") if args.start else None
            enrolment = prepare(plan, args.user, start, tz.key, variables, datetime.now(UTC))
        except EnrolmentError as exc:
            raise UsageError(str(exc)) from None
        await store.consent.upsert_enrollments([enrolment])
        due = enrolment.next_due_at
        when = f"; first step due {due.astimezone(tz).isoformat()}" if due else ""
        return f"enrolled {args.user} in {plan.id}{when}"

    async def many(store: Any, text: str) -> tuple[int, list[Rejected]]:
        plan = await _plan_for(store, settings, args.plan_id)
        if args.tz:
            zone(args.tz, "--tz")
        rows = io.StringIO(text, newline="")
        good, bad = read_csv(rows, plan, datetime.now(UTC), tz=args.tz, start=args.start)
        await store.consent.upsert_enrollments(good)
        return len(good), bad

    if args.var and args.csv:
        raise UsageError("--var is for one user; with --csv, give variables as columns")
    if not args.csv:
        print(asyncio.run(with_store(settings, one)))
        return 0
    started = time.perf_counter()
    try:
        text = Path(args.csv).read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise UsageError(f"cannot read {args.csv}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{args.csv} is not UTF-8 text") from None
    imported, rejected = asyncio.run(with_store(settings, lambda store: many(store, text)))
    seconds = time.perf_counter() - started
    for problem in rejected:
        print(f"rejected  {problem}", file=sys.stderr)
    print(
        f"imported {imported} enrolment(s) into {args.plan_id} in {seconds:.1f} s"
        + (f"; {len(rejected)} row(s) rejected (listed above)" if rejected else "")
    )
    return 1 if rejected else 0


def cmd_runway(args: argparse.Namespace) -> int:
    async def work(store: Any) -> Any:
        return await store.consent.runway(args.plan_id, limit=args.limit)

    report = asyncio.run(with_store(settings_for(args), work))
    if report is None:
        raise UsageError(f"no plan {args.plan_id!r} is loaded")
    if args.json:
        print(json.dumps(report.as_json(), ensure_ascii=False, indent=2))
        return 0
    print(
        f"{report.plan_id} ({report.consent_kind} consent, template {report.template_id}): "
        f"{report.enrolled} active enrolment(s)"
    )
    print(f"  covered to the end:        {report.covered_to_end}")
    print(f"  run dry at the next step:  {report.dry_next}  (ask them again now)")
    print(f"  run dry later:             {report.runs_dry_total - report.dry_next}")
    if report.by_steps_covered:
        spread = ", ".join(f"{k}: {v}" for k, v in sorted(report.by_steps_covered.items()))
        print(f"  steps covered before running dry (steps: users): {spread}")
    if report.runs_dry:
        print("  soonest to run dry:")
        for u in report.runs_dry:
            why = "banned" if u.banned else f"{u.credits} credit(s)"
            when = u.dry_at.isoformat() if u.dry_at else "?"
            print(f"    {u.user_id}  step {u.dry_step} due {when}  ({why})")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("enroll", help="enrol a user in a plan, or import a CSV file of them")
    p.add_argument("plan_id")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="the user's openid")
    who.add_argument(
        "--csv", metavar="FILE", help="a CSV file: openid[,start][,tz],<one column per variable>"
    )
    p.add_argument("--start", help="ISO date-time the timeline starts (default: now)")
    p.add_argument("--tz", help="the user's IANA time zone (with --csv: for rows without one)")
    p.add_argument("--var", action="append", help="a user variable, key=value")
    p.add_argument("--plans", help="plans folder, for a plan no daemon has loaded yet")
    p.set_defaults(func=cmd_enroll)

    p = sub.add_parser("runway", help="how many upcoming steps each user's consent covers")
    p.add_argument("plan_id")
    p.add_argument("--limit", type=int, default=20, help="users listed (default 20)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_runway)
