"""`reminders ledger partitions|prune`: the ledger's months and dropping those past retention
(scheduler/app/ledger.py, docs/operations.md "Ledger lifecycle")."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.app.ledger import PruneReport
    from scheduler.store.ledger import Partition
    from scheduler.store.postgres import Store


def _retention(args: argparse.Namespace) -> int:
    from scheduler.cli.common import UsageError, settings_for

    months: int = (
        args.retention_months
        if args.retention_months is not None
        else settings_for(args).ledger_retention_months
    )
    if months < 2:
        raise UsageError(f"--retention-months {months}: keep at least 2 months of the ledger")
    return months


def _line(partition: Partition, verdict: str) -> str:
    return f"  {partition.label:<14} {partition.rows:>12,} rows  {verdict}"


def cmd_partitions(args: argparse.Namespace) -> int:
    from scheduler.cli.common import run_with_store
    from scheduler.store.ledger import retention_edge

    months = _retention(args)
    edge = retention_edge(datetime.now(UTC), months)

    async def work(store: Store) -> list[Partition]:
        await store.ledger.ensure_partitions()
        return await store.ledger.partitions(edge)

    parts = run_with_store(args, work)
    print(f"ledger partitions (retention {months} months: rows due before {edge:%Y-%m-%d} may go)")
    for p in parts:
        print(_line(p, f"kept: {p.keep}" if p.keep else "may be pruned"))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from scheduler.app.ledger import prune
    from scheduler.cli.common import UsageError, run_with_store

    months = _retention(args)
    export = Path(args.export) if args.export else None
    if export is not None and export.exists() and not export.is_dir():
        raise UsageError(f"--export {args.export}: not a folder")

    async def work(store: Store) -> PruneReport:
        return await prune(
            store,
            retention_months=months,
            now=datetime.now(UTC),
            actor="cli:ledger-prune",
            export_dir=export,
            dry_run=args.dry_run,
        )

    try:
        report = run_with_store(args, work)
    except OSError as exc:  # the export folder or file could not be written
        raise UsageError(f"--export {args.export}: {exc.strerror or exc}") from None
    verb = "would drop" if args.dry_run else "dropped"
    if not report.dropped:
        print(f"nothing to prune (retention {months} months: before {report.edge:%Y-%m-%d})")
    for p in report.dropped:
        print(_line(p, verb))
    for p in report.kept:
        if p.month is not None and p.keep != "within retention":
            print(_line(p, f"kept: {p.keep}"))
    for path in report.exported:
        print(f"  exported {path}")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ledger", help="the ledger's monthly partitions and their prune")
    ledger = p.add_subparsers(dest="ledger_command", required=True)
    for name, func, text in (
        ("partitions", cmd_partitions, "list the months, their rows and whether they may go"),
        ("prune", cmd_prune, "drop the months past retention that nothing needs any more"),
    ):
        q = ledger.add_parser(name, help=text)
        q.add_argument(
            "--retention-months",
            type=int,
            help="months kept (default: REMINDERS_LEDGER_RETENTION_MONTHS, 13)",
        )
        if name == "prune":
            q.add_argument("--dry-run", action="store_true", help="say what would go, drop nothing")
            q.add_argument("--export", metavar="DIR", help="first write each month as gzip CSV")
        q.set_defaults(func=func)
