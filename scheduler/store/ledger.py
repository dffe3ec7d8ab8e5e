"""The ledger's lifecycle: its monthly partitions (migration 014) and the opens' (015), what
retention lets go, and the prune that drops them whole (`reminders ledger prune`, and the daemon
once a day).

A month of opens goes once its whole range ended before the retention's edge. A month of the
ledger goes only when nothing the guarantees need is in it:

- its whole range ended before the retention's edge (now minus `REMINDERS_LEDGER_RETENTION_MONTHS`),
  and no row in it is due after that edge (an inactivity extra step is filed under the period's
  start, `ledger_key_at`, and may be due later);
- no row is `pending` (claimed, perhaps on the wire) or `deferred` (still to be sent);
- no row belongs to an occurrence still `running` (a replica may still claim its users).

A relative step already recorded is not claimed again because its enrolment has moved past it
(`next_step`), not because of its row, so dropping a month of finished rows cannot make a step go
twice; a calendar occurrence older than retention is far past every plan's grace. The counts in
`delivery_counts` stay: a partition dropped fires no delete trigger (migration 010), so status
and the API keep showing what was sent. With an export folder each month is first written as
gzip CSV (PostgreSQL's COPY), fsynced, and only then dropped.

Consent history (`consent_events`) is not pruned: it is the evidence behind every send and the
consent cache is checked against all of it (`reminders consent check`); `plan_events` is the
admins' audit, which grows with their actions, not with sends.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg

MONTHS_AHEAD = 3  # partitions made ahead of the current month

PARTITIONED = ("deliveries", "opens")  # the tables in month partitions, and pruned
_PARTITIONS = """
SELECT c.relname AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = $1::regclass ORDER BY c.relname
"""
_MONTH = re.compile(r"^[a-z]+_y(\d{4})m(\d{2})$")


@dataclass(frozen=True)
class Partition:
    """One partition of `deliveries` or `opens` (`table`): its month (None for DEFAULT), rows,
    and why it must stay (`keep`, None when a prune may drop it)."""

    table: str
    name: str
    month: datetime | None
    rows: int
    keep: str | None

    @property
    def label(self) -> str:
        """The month (or DEFAULT), after the table's name for the opens."""
        month = self.month.strftime("%Y-%m") if self.month else "DEFAULT"
        return month if self.table == "deliveries" else f"{self.table} {month}"


def retention_edge(now: datetime, months: int) -> datetime:
    """The start of the month `months` months before `now`'s (UTC): rows due before it are past
    retention."""
    now = now.astimezone(UTC)
    index = now.year * 12 + now.month - 1 - months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def _month_end(month: datetime) -> datetime:
    index = month.year * 12 + month.month  # the next month's index (0-based months)
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


class LedgerStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def ensure_partitions(self, months_ahead: int = MONTHS_AHEAD) -> list[str]:
        """Make the months missing up to `months_ahead` after this one; returns their names."""
        created: list[str] = await self.pool.fetchval(
            "SELECT ensure_ledger_partitions($1)", months_ahead
        )
        return created

    async def partitions(self, edge: datetime, table: str | None = None) -> list[Partition]:
        """Every partition of `table` (None: of each of PARTITIONED), each table's oldest month
        first (DEFAULT last), with its verdict against the retention `edge` (`retention_edge`)."""
        found = []
        async with self.pool.acquire() as conn:
            for parent in PARTITIONED if table is None else (table,):
                months = []
                for r in await conn.fetch(_PARTITIONS, parent):
                    match = _MONTH.match(r["name"])
                    month = datetime(int(match[1]), int(match[2]), 1, tzinfo=UTC) if match else None
                    months.append(await _judge(conn, parent, r["name"], month, edge))
                found += sorted(months, key=lambda p: (p.month is None, p.month or edge))
        return found

    async def export(self, partition: Partition, folder: Path) -> Path:
        """Write the partition as gzip CSV with a header into `folder` (complete and fsynced
        before it gets its name); returns the file. The file work runs in a thread."""
        assert partition.month is not None, "DEFAULT is never exported"
        final = folder / f"{partition.table}-{partition.month:%Y-%m}.csv.gz"
        partial = final.with_name(final.name + ".partial")
        raw = await asyncio.to_thread(_create, partial)
        try:
            out = gzip.GzipFile(fileobj=raw, mode="wb", filename=final.name[:-3])

            async def write(data: bytes) -> None:
                await asyncio.to_thread(out.write, data)

            async with self.pool.acquire() as conn:
                await conn.copy_from_table(partition.name, output=write, format="csv", header=True)
            await asyncio.to_thread(out.close)
            await asyncio.to_thread(_seal, raw, partial, final)
        finally:
            raw.close()
        return final

    async def drop(self, partition: Partition, edge: datetime, actor: str) -> bool:
        """Drop the partition if it still may go (judged again under its lock); False if not.
        The drop is recorded in plan_events."""
        assert partition.month is not None, "DEFAULT is never dropped"
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                await conn.execute(f"LOCK TABLE {_ident(partition.name)} IN ACCESS EXCLUSIVE MODE")
            except asyncpg.UndefinedTableError:  # another replica's prune dropped it
                return False
            now = await _judge(conn, partition.table, partition.name, partition.month, edge)
            if now.keep is not None or now.rows != partition.rows:
                return False
            await conn.execute(
                f"ALTER TABLE {_ident(partition.table)} DETACH PARTITION {_ident(partition.name)}"
            )
            await conn.execute(f"DROP TABLE {_ident(partition.name)}")
            month = partition.month.strftime("%Y-%m")
            details = {"partition": partition.name, "month": month, "rows": now.rows}
            what = "ledger" if partition.table == "deliveries" else partition.table
            await conn.execute(
                "INSERT INTO plan_events (action, actor, reason, details)"
                " VALUES ('ledger_prune', $1, $2, $3)",
                actor,
                f"{what} month {month} past retention ({now.rows} rows)",
                details,  # jsonb: the pool's codec encodes it
            )
        return True


async def _judge(
    conn: Any, parent: str, name: str, month: datetime | None, edge: datetime
) -> Partition:
    table = _ident(name)
    rows: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    keep: str | None = None
    if month is None:
        keep = "the DEFAULT partition (rows of months without one)"
    elif _month_end(month) > edge:
        keep = "within retention"
    elif parent != "deliveries":
        pass  # opens: nothing but their time keeps them
    elif await conn.fetchval(
        f"SELECT EXISTS (SELECT 1 FROM {table} WHERE status IN ('pending', 'deferred'))"
    ):
        keep = "holds pending or deferred rows"
    elif await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM occurrences o WHERE o.state = 'running'"
        f" AND EXISTS (SELECT 1 FROM {table} d"
        "  WHERE d.plan_id = o.plan_id AND d.occurrence = o.occurrence))"
    ):
        keep = "holds rows of a running occurrence"
    elif await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table} WHERE due_at >= $1)", edge):
        keep = "holds rows due within retention"
    return Partition(parent, name, month, rows, keep)


def _create(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "wb")


def _seal(raw: BinaryIO, partial: Path, final: Path) -> None:
    """On disk for good (fsynced), then under its real name."""
    raw.flush()
    os.fsync(raw.fileno())
    os.replace(partial, final)


def _ident(name: str) -> str:
    """A partitioned table's or a partition's name as SQL: they come from pg_class (or
    PARTITIONED) and match deliveries* or opens*."""
    if not re.fullmatch(r"(deliveries|opens)(_[a-z0-9_]+)?", name):
        raise ValueError(f"not a ledger partition: {name!r}")
    return '"' + name + '"'
