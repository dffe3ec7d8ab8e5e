"""`scheduler/store/schema.sql` is the schema every migration gives a fresh database."""

from __future__ import annotations

import difflib

import asyncpg

from scheduler.store.schema import REGENERATE, SCHEMA_FILE, migrated_snapshot, snapshot


async def test_the_snapshot_is_the_migrated_schema(pg_url: str) -> None:
    actual = await migrated_snapshot(pg_url)
    expected = SCHEMA_FILE.read_text(encoding="utf-8") if SCHEMA_FILE.is_file() else ""
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile="scheduler/store/schema.sql (committed)",
                tofile="the schema after every migration",
            )
        )
        raise AssertionError(
            "scheduler/store/schema.sql is out of date with the migrations. Regenerate it with\n"
            f"    {REGENERATE}\n"
            "and commit it with the migration.\n\n" + diff
        )


async def test_the_snapshot_sees_a_change_of_schema(db_url: str) -> None:
    """A column, an index and a function changed after the migrations show in the snapshot."""
    conn = await asyncpg.connect(db_url)
    try:
        before = await snapshot(conn)
        await conn.execute(
            "ALTER TABLE plans ADD COLUMN note text DEFAULT 'x';"
            "CREATE INDEX plans_note ON plans (note);"
            "CREATE FUNCTION answer(p int) RETURNS int LANGUAGE sql AS 'SELECT 42';"
        )
        after = await snapshot(conn)
    finally:
        await conn.close()
    added = {line.strip() for line in after.splitlines()} - {
        line.strip() for line in before.splitlines()
    }
    assert "note            text DEFAULT 'x'::text," in added, added
    assert "CREATE INDEX plans_note ON public.plans USING btree (note);" in added, added
    assert "--   answer(p integer) -> integer" in added, added
