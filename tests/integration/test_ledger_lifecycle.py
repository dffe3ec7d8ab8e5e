"""The ledger's monthly partitions (migration 014) and their prune (scheduler/app/ledger.py):
what a prune drops and what it must keep, that the counts keep what it drops, the export, the
key that keeps a send from going twice, and the migration of a ledger from before 014."""

from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError

from scheduler.app.ledger import prune
from scheduler.settings import Settings
from scheduler.store.consent import OpenReport
from scheduler.store.ledger import retention_edge
from scheduler.store.postgres import Store
from tests.conftest import with_database
from tests.support import calendar_plan, register

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
OLD = datetime(2025, 1, 10, 1, 0, tzinfo=UTC)  # 23 months before NOW: past a 13-month retention
COUNTED = (
    "SELECT coalesce(sum(n), 0) FROM"
    " (SELECT n FROM delivery_counts UNION ALL SELECT n FROM delivery_counts_delta) AS c"
)


def at(month: int, year: int = 2025) -> datetime:
    return datetime(year, month, 10, 1, 0, tzinfo=UTC)


async def missed(store: Store, occurrence: str, due: datetime, users: int, plan: str = "p") -> None:
    rows = [(occurrence, f"u{k}", 1, due) for k in range(users)]
    await store.skip(
        plan_id=plan, version=1, replica="r", rows=rows, status="missed", reason="grace_exceeded"
    )


async def months(store: Store) -> dict[str, int]:
    """Rows per month partition of the ledger (DEFAULT included)."""
    edge = retention_edge(NOW, 13)
    return {p.label: p.rows for p in await store.ledger.partitions(edge, "deliveries")}


async def test_prune_drops_only_what_nothing_needs_and_the_counts_keep_it(
    store: Store, tmp_path: Path
):
    await register(store, calendar_plan())
    await missed(store, "2025-01-10T01:00:00+00:00", OLD, 30)  # old and finished: goes
    await missed(store, "feb", at(2), 5)
    await store.pool.execute(  # a deferred send: still to go
        "UPDATE deliveries SET status = 'deferred', defer_until = $1 WHERE occurrence = 'feb'"
        " AND user_id = 'u0'",
        NOW + timedelta(days=1),
    )
    await missed(store, "mar", at(3), 5)
    await store.pool.execute(
        "UPDATE deliveries SET status = 'pending' WHERE occurrence = 'mar' AND user_id = 'u0'"
    )
    await missed(store, "apr", at(4), 5, plan="alerts")
    await store.pool.execute(  # its occurrence still running: a replica may claim more of it
        "INSERT INTO occurrences (plan_id, occurrence, step, fire_time, total)"
        " VALUES ('alerts', 'apr', 1, $1, 10)",
        at(4),
    )
    await missed(store, "extra:nudge:since:2025-05-10T01:00:00+00:00", at(12), 3)  # due later
    await missed(store, "recent", NOW - timedelta(days=40), 7)
    before = await store.pool.fetchval(COUNTED)
    assert before == 30 + 5 + 5 + 5 + 3 + 7

    dry = await prune(store, retention_months=13, now=NOW, actor="test", dry_run=True)
    assert [p.label for p in dry.dropped] == ["2025-01"]
    assert (await months(store))["2025-01"] == 30  # a dry run drops nothing

    report = await prune(
        store, retention_months=13, now=NOW, actor="test", export_dir=tmp_path / "out"
    )
    assert [p.label for p in report.dropped] == ["2025-01"]
    kept = {p.label: p.keep for p in report.kept}
    assert kept["2025-02"] == "holds pending or deferred rows"
    assert kept["2025-03"] == "holds pending or deferred rows"
    assert kept["2025-04"] == "holds rows of a running occurrence"
    assert kept["2025-05"] == "holds rows due within retention"
    assert kept[(NOW - timedelta(days=40)).strftime("%Y-%m")] == "within retention"
    left = await months(store)
    assert "2025-01" not in left and left["2025-02"] == 5
    assert await store.pool.fetchval("SELECT count(*) FROM deliveries") == before - 30
    assert await store.pool.fetchval(COUNTED) == before  # the counts keep the dropped month

    [exported] = report.exported
    with gzip.open(exported, "rt", encoding="utf-8") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 30 and {r["status"] for r in lines} == {"missed"}
    assert not list(exported.parent.glob("*.partial"))
    event = await store.pool.fetchrow(
        "SELECT actor, details FROM plan_events WHERE action = 'ledger_prune'"
    )
    assert event["actor"] == "test" and event["details"]["rows"] == 30

    again = await prune(store, retention_months=13, now=NOW, actor="test")
    assert again.dropped == []


async def test_rows_of_a_month_without_a_partition_move_into_it_when_it_is_made(store: Store):
    await missed(store, "far", datetime(2031, 5, 1, tzinfo=UTC), 4)
    assert (await months(store))["DEFAULT"] == 4
    created = await store.ledger.ensure_partitions()
    assert "deliveries_y2031m05" in created
    assert "deliveries_y2030m05" not in created  # not every month up to it
    left = await months(store)
    assert left["2031-05"] == 4 and left["DEFAULT"] == 0
    await missed(store, "far", datetime(2031, 5, 1, tzinfo=UTC), 6)  # the same key meets its row
    assert (await months(store))["2031-05"] == 6


async def opens_by_month(store: Store) -> dict[str, int]:
    return {
        p.label: p.rows for p in await store.ledger.partitions(retention_edge(NOW, 13), "opens")
    }


async def test_opens_are_in_month_partitions_and_go_once_past_retention(
    store: Store, tmp_path: Path
):
    """Opens (migration 015): one partition a month, the far-off one moved out of DEFAULT when
    it is made, a repeated report still recorded once, and a prune drops a month of them whole
    once it is past retention (exported first) while it keeps the recent ones."""
    opened = [
        OLD,
        OLD + timedelta(hours=1),
        NOW - timedelta(days=3),
        datetime(2031, 5, 1, tzinfo=UTC),
    ]
    reports = [OpenReport(f"u{k}", 1001, when, None, "test") for k, when in enumerate(opened)]
    assert await store.consent.record_opens(reports) == (4, 0)
    assert await store.consent.record_opens(reports[:1]) == (0, 1)  # opens_once holds across them
    await store.ledger.ensure_partitions()
    await store.pool.execute("SELECT ensure_ledger_partitions(0, $1)", OLD)
    found = await opens_by_month(store)
    assert found["opens 2025-01"] == 2 and found["opens 2031-05"] == 1
    assert found["opens DEFAULT"] == 0 and found[f"opens {NOW - timedelta(days=3):%Y-%m}"] == 1

    report = await prune(
        store, retention_months=13, now=NOW, actor="test", export_dir=tmp_path / "out"
    )
    dropped = {p.label: p.rows for p in report.dropped}
    assert dropped["opens 2025-01"] == 2
    assert all(p.month and p.month < retention_edge(NOW, 13) for p in report.dropped)
    left = await store.pool.fetch("SELECT user_id FROM opens ORDER BY user_id")
    assert [r["user_id"] for r in left] == ["u2", "u3"]
    [exported] = [f for f in report.exported if f.name == "opens-2025-01.csv.gz"]
    with gzip.open(exported, "rt", encoding="utf-8") as f:
        assert sorted(r["user_id"] for r in csv.DictReader(f)) == ["u0", "u1"]
    event = await store.pool.fetchval(
        "SELECT reason FROM plan_events WHERE action = 'ledger_prune'"
        " AND details ->> 'partition' = 'opens_y2025m01'"
    )
    assert event == "opens month 2025-01 past retention (2 rows)"


async def test_the_key_is_the_occurrence_user_and_key_time(store: Store):
    """A calendar occurrence met twice is one row; an inactivity extra step claimed by two
    steps with different due times is one row (its key_at is the period's start); a relative
    step of a new timeline (a new due time) is a new row."""
    since = "extra:nudge:since:2026-03-01T00:00:00+00:00"
    await missed(store, "2026-03-02T01:00:00+00:00", datetime(2026, 3, 2, 1, tzinfo=UTC), 3)
    await missed(store, "2026-03-02T01:00:00+00:00", datetime(2026, 3, 2, 1, tzinfo=UTC), 3)
    await missed(store, since, datetime(2026, 3, 5, 1, tzinfo=UTC), 3)
    await missed(store, since, datetime(2026, 4, 9, 1, tzinfo=UTC), 3)
    await missed(store, "step-1", datetime(2026, 3, 5, 1, tzinfo=UTC), 3)
    await missed(store, "step-1", datetime(2026, 6, 5, 1, tzinfo=UTC), 3)  # enrolled again
    rows = await store.pool.fetch(
        "SELECT occurrence, count(*) AS n, min(key_at) AS key_at FROM deliveries"
        " GROUP BY occurrence ORDER BY occurrence"
    )
    got = {r["occurrence"]: (r["n"], r["key_at"]) for r in rows}
    assert got["2026-03-02T01:00:00+00:00"][0] == 3
    assert got[since] == (3, datetime(2026, 3, 1, tzinfo=UTC))
    assert got["step-1"][0] == 6


def test_a_retention_below_two_months_is_refused():
    with pytest.raises(ValidationError, match="ledger_retention_months"):
        Settings(ledger_retention_months=1)


def test_the_cli_prune_on_a_fresh_database_has_nothing_to_do(db_url: str):
    env = {**os.environ, "DATABASE_URL": db_url}
    done = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "ledger", "prune"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "nothing to prune" in done.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "ledger", "prune", "--retention-months", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "at least 2 months" in refused.stderr


async def test_migrations_014_and_015_keep_a_ledger_and_opens_written_before_them(pg_url: str):
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    url = with_database(pg_url, name)
    try:
        conn = await asyncpg.connect(url)
        await conn.execute(
            "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        files = sorted(
            (f for f in resources.files("scheduler.store.migrations").iterdir()),
            key=lambda f: f.name,
        )
        for file in files:
            if file.name.endswith(".sql") and file.name < "014":
                await conn.execute(file.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations VALUES ($1)", file.name)
        await conn.execute(
            "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
            " status, finished_at)"
            " SELECT 'p', 1, 'occ-' || (k % 3), 'u' || k, 1,"
            "  timestamptz '2025-06-01 01:00+00' + (k % 3) * interval '40 days', 'sent', now()"
            " FROM generate_series(1, 300) AS k"
        )
        before = await conn.fetch("SELECT id, occurrence, user_id, status FROM deliveries")
        await conn.execute(
            "INSERT INTO opens (user_id, scene, opened_at, source)"
            " SELECT 'u' || k, 1001, timestamptz '2025-06-01 01:00+00' + k * interval '9 days',"
            "  'test' FROM generate_series(1, 6) AS k"
        )
        opens_before = await conn.fetch("SELECT * FROM opens ORDER BY id")
        await conn.close()
        async with Store.open(url) as store:
            assert await store.migrate() == [f.name for f in files if f.name >= "014"]
            after = await store.pool.fetch("SELECT id, occurrence, user_id, status FROM deliveries")
            assert sorted(map(tuple, after)) == sorted(map(tuple, before))
            assert await store.pool.fetchval(COUNTED) == 300  # counted once, not twice
            opens_after = await store.pool.fetch("SELECT * FROM opens ORDER BY id")
            assert list(map(tuple, opens_after)) == list(map(tuple, opens_before))  # 015
            assert (await opens_by_month(store))["opens 2025-07"] == 3
            parts = await months(store)
            assert parts["2025-06"] == 100 and parts["2025-07"] == 100
            await missed(store, "new", NOW, 1)
            new_id = await store.pool.fetchval("SELECT id FROM deliveries WHERE occurrence='new'")
            assert new_id > max(r["id"] for r in before)  # the sequence went on
            await store.skip(  # u1's row of occ-1 from before the migration: met, not doubled
                plan_id="p",
                version=1,
                replica="r",
                rows=[("occ-1", "u1", 1, datetime(2025, 7, 11, 1, tzinfo=UTC))],
                status="missed",
                reason="grace_exceeded",
            )
            assert await store.pool.fetchval(COUNTED) == 301
    finally:
        admin = await asyncpg.connect(pg_url)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
