"""`reminders report PLAN`: a plan's engagement figures (docs/engagement.md) as a table, CSV or
JSON, per day, step, version or variant, for the deliveries due in a range of local days."""

from __future__ import annotations

import argparse
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scheduler.store.postgres import Store


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date, e.g. 2026-03-01") from None


def cmd_report(args: argparse.Namespace) -> int:
    from scheduler.app import engagement
    from scheduler.cli.common import UsageError, run_with_store, settings_for
    from scheduler.domain.engagement import range_problem, zone_problem

    problem = range_problem(args.start, args.end) or (
        zone_problem(args.tz) if args.tz is not None else None
    )
    if problem:
        raise UsageError(problem)
    policy = engagement.policy_of(settings_for(args).plans_dir)
    window = policy.engagement.attribution_window.as_timedelta()

    async def work(store: Store) -> dict[str, Any] | None:
        return await engagement.report(
            store,
            args.plan_id,
            now=datetime.now(UTC),
            window=window,
            start=args.start,
            end=args.end,
            by=args.by,
            tz=args.tz,
            guard=policy.guard_for(args.plan_id),
        )

    report = run_with_store(args, work)
    if report is None:
        raise UsageError(f"no plan {args.plan_id!r} is loaded (see `reminders status`)")
    print(engagement.render(report, args.format))
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `report` to the `reminders` parser."""
    from scheduler.domain.engagement import FORMATS, GROUPINGS

    p = sub.add_parser(
        "report", help="a plan's sends, deliveries, opens and cancellations, with their rates"
    )
    p.add_argument("plan_id")
    p.add_argument(
        "--from", dest="start", type=_day, help="first local day of the deliveries (YYYY-MM-DD)"
    )
    p.add_argument("--to", dest="end", type=_day, help="last local day, included (YYYY-MM-DD)")
    p.add_argument("--by", choices=GROUPINGS, default="step", help="one row per ... (default step)")
    p.add_argument("--format", choices=FORMATS, default="table", help="output (default table)")
    p.add_argument("--tz", help="IANA zone of the days (default: a calendar plan's, else UTC)")
    p.set_defaults(func=cmd_report)
