"""The `reminders` command line.

Errors a user can cause are printed plainly, never as tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

from scheduler.cli.common import (
    UsageError,
    adapt_notes,
    aware,
    pairs,
    settings_for,
    with_store,
    zone,
)
from scheduler.errors import ConfigError, PlanError, RemindersError
from scheduler.settings import load_settings

if TYPE_CHECKING:
    from scheduler.domain.consent import ConsentState
    from scheduler.domain.plan import Plan
    from scheduler.domain.rules import DryRun
    from scheduler.domain.schedule import Occurrence
    from scheduler.store.postgres import Store


log = logging.getLogger("scheduler")


# --- validate / preview -------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from scheduler.planfiles import check_plans

    policy = Path(args.policy) if args.policy else None
    now = datetime.now(UTC)
    checked = check_plans((Path(p) for p in args.paths), now, policy)
    warnings = [(str(i.path), w) for i in checked.plans for w in _schedule_warnings(i.plan, now)]
    if args.json:
        report: dict[str, object] = {
            "valid": [{"file": str(i.path), "id": i.plan.id} for i in checked.plans],
            "errors": [
                {"file": p.file, "field": p.field, "reason": p.reason} for p in checked.problems
            ],
        }
        if warnings:
            report["warnings"] = [
                {"file": f, "field": "schedule.calendar", "reason": w} for f, w in warnings
            ]
        if checked.policies:
            report["policies"] = [str(p) for p in checked.policies]
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        for path in checked.policies:
            print(f"ok     {path} (policy)")
        for item in checked.plans:
            print(f"ok     {item.path} ({item.plan.id})")
        for file, warning in warnings:
            print(f"warn   {file}: schedule.calendar: {warning}")
        for problem in checked.problems:
            print(f"error  {problem}")
        if not checked.plans and not checked.policies and not checked.problems:
            print("no plan files found")
    found = checked.plans or checked.policies
    return 1 if checked.problems or not found else 0


def _schedule_warnings(plan: Plan, now: datetime) -> list[str]:
    from scheduler.domain.schedule import calendar_anchor, schedule_warnings

    cal = plan.schedule.calendar
    return schedule_warnings(cal, calendar_anchor(cal, now)) if cal is not None else []


def _mark(run: DryRun) -> dict[str, str] | None:
    """What a rule does to one previewed step: None when it goes out on time."""
    decision = run.decision
    if decision.violation is not None:
        v = decision.violation
        return {"outcome": "skipped", "reason": v.reason.value, "rule": v.rule, "detail": v.detail}
    if run.deferred is not None:
        v = run.deferred
        assert run.sent_at is not None  # deferred, and not skipped after: it goes at sent_at
        return {
            "outcome": "deferred",
            "reason": v.reason.value,
            "rule": v.rule,
            "detail": v.detail,
            "until": run.sent_at.isoformat(),
        }
    return None


def _extra_steps(
    plan: Plan, step: int, due: datetime, tz: ZoneInfo, variables: dict[str, str]
) -> list[dict[str, Any]]:
    """Each extra step's message as it would go out at `step` (docs/plans.md#adapt)."""
    from scheduler.domain.messages import RenderError, render

    rows: list[dict[str, Any]] = []
    for name in plan.message.extra:
        try:
            message: dict[str, str] = render(plan, step, due, tz, "", variables, extra=name)
        except RenderError as exc:
            message = {"error": f"{exc} (pass it with --var)"}
        rows.append({"name": name, "message": message})
    return rows


def cmd_preview(args: argparse.Namespace) -> int:
    from scheduler.domain.rules import dry_run
    from scheduler.domain.schedule import (
        calendar_anchor,
        calendar_occurrences,
        relative_occurrences,
        skipped_days,
    )
    from scheduler.planfiles import load_plan_file, load_policy, policy_file_for

    plan_path = Path(args.plan_file)
    plan = load_plan_file(plan_path).plan
    policy = load_policy(Path(args.policy) if args.policy else policy_file_for(plan_path))
    now = datetime.now(UTC)
    if plan.schedule.calendar is not None:
        cal = plan.schedule.calendar
        tz = ZoneInfo(cal.timezone)
        start = aware(args.start, "--from", tz) if args.start else now
        anchor = calendar_anchor(cal, start)
        occurrences: Iterator[Occurrence] = (
            o for o in calendar_occurrences(cal, anchor) if o.due_at >= start
        )
    else:
        tz = zone(args.tz)
        start = aware(args.start, "--from", tz) if args.start else now
        occurrences = relative_occurrences(plan, start, tz)
    variables = dict(pairs(args.var))
    rows: list[dict[str, Any]] = []
    limited = zip(occurrences, range(args.count), strict=False)
    for run in dry_run(plan, policy, (o for o, _ in limited), tz, variables, args.user):
        occurrence = run.occurrence
        data = (
            run.message
            if run.message is not None
            else {"error": f"{run.error} (pass it with --var)"}
        )
        rows.append(
            {
                "step": occurrence.step,
                "local": occurrence.due_at.astimezone(tz).isoformat(),
                "utc": occurrence.due_at.isoformat(),
                "message": data,
                "variant": run.variant,
                "rule": _mark(run),
            }
        )
    skipped: list[dict[str, str]] = []
    warnings = _schedule_warnings(plan, start)
    if plan.schedule.calendar is not None and rows:
        until = datetime.fromisoformat(rows[-1]["utc"])
        skipped = [
            {"local": moment.astimezone(tz).isoformat(), "reason": why}
            for moment, why in skipped_days(plan.schedule.calendar, start, until)
        ]
    notes = adapt_notes(plan)
    extras = _extra_steps(plan, 1, start, tz, variables) if plan.message.extra else []
    if args.json:
        report = {
            "plan": plan.id,
            "occurrences": rows,
            "skipped": skipped,
            "warnings": warnings,
            "adapt": {"notes": notes, "extra_steps": extras},
        }
        print(json.dumps(report, ensure_ascii=False, indent=2))
        return 0
    print(
        f"{plan.id}: {plan.name} ({'relative to enrolment' if plan.is_relative else 'calendar'},"
        f" {tz.key})"
    )
    for warning in warnings:
        print(f"  warning: {warning}")
    for note in notes:
        print(f"  adapt: {note}")
    for extra in extras:
        text = "; ".join(f"{k}={v}" for k, v in extra["message"].items())
        print(f"  extra {extra['name']} (sent when a rule says so, at step 1 here): {text}")
    days_off = {row["local"][:10]: row["reason"] for row in skipped}
    for row in rows:
        for day in [d for d in days_off if d < row["local"][:10]]:
            print(f"  skipped   {day}  ({days_off.pop(day)})")
        text = "; ".join(f"{k}={v}" for k, v in row["message"].items())
        if row["variant"] is not None:
            text = f"[variant {row['variant']}] {text}"
        print(f"  step {row['step']:>3}  {row['local']}  (UTC {row['utc'][:16]})  {text}")
        if (mark := row["rule"]) is not None:
            held = f" until {mark['until'][:16]}" if "until" in mark else ""
            print(f"             {mark['outcome']}{held}: {mark['reason']}: {mark['detail']}")
    if not rows:
        print("  no occurrences left")
    return 0


# --- database-backed commands -------------------------------------------------------------------


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    async def work(store: Store) -> list[str]:
        return await store.migrate()

    applied = asyncio.run(with_store(settings_for(args), work))
    print("applied: " + ", ".join(applied) if applied else "database is up to date")
    return 0


def cmd_consent(args: argparse.Namespace) -> int:
    from scheduler.domain.consent import Result, consent_problem
    from scheduler.domain.plan import ConsentKind
    from scheduler.store.consent import ConsentReport

    kind = ConsentKind(args.kind)

    async def work(store: Store) -> ConsentState:
        # The API's rule (POST /v1/consent answers 422): only templates the plans use, as the
        # kind they declare; recorded through the same writer.
        problem = consent_problem(await store.consent.template_kinds(), args.template, kind)
        if problem is not None:
            raise UsageError(f"consent not recorded: {problem.message}")
        report = ConsentReport(args.user, args.template, Result(args.result), "cli", kind=kind)
        recorded = await store.consent.record([report])
        return recorded.states[(args.user, args.template)]

    state = asyncio.run(with_store(settings_for(args), work))
    print(
        f"recorded {args.result} ({args.kind}) for {args.user} on {args.template}: "
        f"{state.credits} one-time credit(s), long-term {'on' if state.long_term else 'off'}"
        f"{', banned' if state.banned else ''}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from scheduler.app.daemon import has_credentials, run

    settings = settings_for(args)
    if not settings.plans_dir.is_dir():
        raise UsageError(
            f"plans folder {settings.plans_dir} does not exist (set REMINDERS_PLANS_DIR)"
        )
    if args.demo and has_credentials(settings):
        raise UsageError(
            "--demo enrols demo users: it runs only against the fake WeChat "
            "(unset REMINDERS_WECHAT_APPID / REMINDERS_WECHAT_SECRET)"
        )
    try:
        asyncio.run(run(settings, demo=args.demo))
    except BaseExceptionGroup as group:  # APScheduler's task groups wrap what start-up raised
        raise _our_error(group) or group from None
    return 0


def _our_error(group: BaseExceptionGroup) -> RemindersError | None:
    """The first of our own errors inside (nested) exception groups: it has the clear line."""
    for exc in group.exceptions:
        found = _our_error(exc) if isinstance(exc, BaseExceptionGroup) else exc
        if isinstance(found, RemindersError):
            return found
    return None


def cmd_health(args: argparse.Namespace) -> int:
    from scheduler.app.daemon import replica_identity

    settings = settings_for(args)
    replica = replica_identity(settings)

    async def work(store: Store) -> bool:
        return await store.status.replica_alive(replica)

    healthy = asyncio.run(with_store(settings, work))
    print(f"replica {replica}: {'healthy' if healthy else 'no recent heartbeat'}")
    return 0 if healthy else 1


def cmd_fake_wechat(args: argparse.Namespace) -> int:
    from scheduler.testing.fake_wechat import serve

    try:
        asyncio.run(serve(args.host, args.port, check_consent=args.check_consent))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from scheduler.domain.plan import Plan

    print(json.dumps(Plan.model_json_schema(), indent=2, ensure_ascii=False))
    return 0


# --- wiring -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reminders",
        description="Long-term recurring reminders over WeChat subscribe messages.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the daemon on the plans folder")
    p.add_argument("--plans", help="plans folder (default: $REMINDERS_PLANS_DIR or ./plans)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="with the fake WeChat: enrol demo users and add a plan firing every 10 s",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "health", help="exit 0 if this replica's daemon is alive (for health checks)"
    )
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("validate", help="check plan files and folders")
    p.add_argument("paths", nargs="+")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--policy", help="policy file (default: policy.yaml in each plans folder)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("preview", help="list a plan's next occurrences and messages")
    p.add_argument("plan_file")
    p.add_argument("--from", dest="start", help="ISO date-time to preview from (default: now)")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--tz", default="Asia/Shanghai", help="user's time zone (relative plans)")
    p.add_argument("--var", action="append", help="a user variable, key=value")
    p.add_argument(
        "--user",
        default="preview-user",
        help="the user (openid) previewed: {user}, and which content variants they get",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--policy", help="policy file (default: policy.yaml next to the plan)")
    p.set_defaults(func=cmd_preview)

    p = sub.add_parser("db", help="database maintenance")
    db = p.add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="apply the SQL migrations")
    up.set_defaults(func=cmd_db_upgrade)

    from scheduler.cli.ingest import add_commands  # enroll (one user or a CSV), runway

    add_commands(sub)

    from scheduler.cli import ledger  # ledger partitions, ledger prune

    ledger.add_commands(sub)

    p = sub.add_parser("consent", help="record a user's consent popup result")
    p.add_argument("--user", required=True)
    p.add_argument("--template", required=True)
    p.add_argument("--kind", required=True, choices=["one_time", "long_term"])
    p.add_argument("--result", required=True, choices=["accept", "reject", "ban", "filter"])
    p.set_defaults(func=cmd_consent)

    p = sub.add_parser("fake-wechat", help="serve a fake WeChat API on loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8399)
    p.add_argument("--check-consent", action="store_true", help="answer 43101 without a grant")
    p.set_defaults(func=cmd_fake_wechat)

    p = sub.add_parser("schema", help="print the plan file JSON Schema")
    p.set_defaults(func=cmd_schema)

    from scheduler.cli.ops import add_commands as add_operating_commands

    add_operating_commands(sub)

    from scheduler.cli.simulate import add_commands as add_simulate

    add_simulate(sub)

    from scheduler.cli.report import add_commands as add_report

    add_report(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from scheduler.logging_setup import configure as configure_logging

    try:
        settings = load_settings()
        level, json_lines = settings.log_level.upper(), settings.log_json
    except ConfigError:
        level, json_lines = "INFO", False  # the command itself reports the bad setting
    configure_logging(
        level if args.command in ("run", "fake-wechat") else "WARNING", json_lines=json_lines
    )
    command: Callable[[argparse.Namespace], int] = args.func  # each subparser's cmd_*
    try:
        return command(args)
    except PlanError as exc:
        print("error  " + str(exc).replace("\n", "\nerror  "), file=sys.stderr)
        return 1
    except RemindersError as exc:
        print(f"reminders: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
