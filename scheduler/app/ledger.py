"""Pruning the ledger past retention: the one routine behind `reminders ledger prune` and the
daemon's daily job. What may go and why is scheduler/store/ledger.py's to judge."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from scheduler.store.ledger import Partition, retention_edge
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    edge: datetime  # rows due before this are past retention
    dropped: list[Partition] = field(default_factory=list)  # or, in a dry run, would be
    kept: list[Partition] = field(default_factory=list)
    exported: list[Path] = field(default_factory=list)


async def prune(
    store: Store,
    *,
    retention_months: int,
    now: datetime,
    actor: str,
    export_dir: Path | None = None,
    dry_run: bool = False,
) -> PruneReport:
    """Drop every month of the ledger and of the opens that retention lets go (exporting it
    first into `export_dir`); the others are reported with why they stay."""
    await store.ledger.ensure_partitions()
    report = PruneReport(retention_edge(now, retention_months))
    for partition in await store.ledger.partitions(report.edge):
        if partition.keep is not None or dry_run:
            (report.kept if partition.keep else report.dropped).append(partition)
            continue
        if export_dir is not None:
            report.exported.append(await store.ledger.export(partition, export_dir))
        if await store.ledger.drop(partition, report.edge, actor):
            report.dropped.append(partition)
            log.info(
                "month %s dropped (%d rows, past retention)",
                partition.label,
                partition.rows,
                extra={"partition": partition.name, "rows": partition.rows},
            )
        else:  # it changed while it was exported: the next prune looks again
            report.kept.append(replace(partition, keep="changed"))
    return report
