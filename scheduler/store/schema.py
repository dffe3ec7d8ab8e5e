"""The schema after every migration, as one readable file: `scheduler/store/schema.sql`.

The migrations (`migrations/NNN_*.sql`) are the truth and the only thing ever applied; reading
the current schema from them means replaying their ALTERs in one's head. `schema.sql` is that
replay done by PostgreSQL: a fresh database is migrated, and its catalogs are printed (tables
with their columns, defaults and constraints, indexes, sequences, types, views, triggers, and
functions with their full definitions), every list sorted by name, with no OID, so the same
migrations always give the same file. After adding or changing a migration, regenerate it with

    .venv/bin/python -m scheduler.store.schema > scheduler/store/schema.sql

(an embedded PostgreSQL is started for it; `--server URL` uses an existing server instead, on
which a scratch database is created and dropped). `tests/integration/test_schema_snapshot.py`
fails, with the diff, when the file is out of date.

The catalogs are read with queries rather than `pg_dump`, whose major version must match the
server's (the machine's `pg_dump` and pgserver's PostgreSQL need not agree). Only the `public`
schema is printed: APScheduler's tables live in its own `apscheduler` schema, created by
APScheduler at start-up, not by the migrations. A partitioned table is printed without its
partitions: the ledger's monthly ones are named after the month they were made in
(`ensure_ledger_partitions`), and they are its copies.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import asyncpg

from scheduler.store.conn import Conn
from scheduler.store.postgres import Store
from scheduler.store.scratch import scratch_database

SCHEMA_FILE = Path(__file__).with_name("schema.sql")
REGENERATE = ".venv/bin/python -m scheduler.store.schema > scheduler/store/schema.sql"

# Everything below is read from this schema, with names printed unqualified where PostgreSQL
# allows (pg_get_functiondef always qualifies the function's own name).
SCHEMA = "public"

_EXTENSIONS = """
SELECT quote_ident(e.extname) AS name
FROM pg_extension e
WHERE e.extname <> 'plpgsql'
ORDER BY e.extname
"""

_TYPES = """
SELECT quote_ident(t.typname) AS name, t.typtype::text AS kind,
       format_type(t.typbasetype, t.typtypmod) AS base, t.typnotnull AS not_null,
       t.typdefault AS default_expr,
       ARRAY(SELECT e.enumlabel::text FROM pg_enum e WHERE e.enumtypid = t.oid
             ORDER BY e.enumsortorder) AS labels,
       ARRAY(SELECT 'CONSTRAINT ' || quote_ident(c.conname) || ' ' || pg_get_constraintdef(c.oid)
             FROM pg_constraint c WHERE c.contypid = t.oid ORDER BY c.conname) AS checks,
       ARRAY(SELECT quote_ident(a.attname) || ' ' || format_type(a.atttypid, a.atttypmod)
             FROM pg_attribute a WHERE a.attrelid = t.typrelid AND a.attnum > 0
               AND NOT a.attisdropped ORDER BY a.attnum) AS fields
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
LEFT JOIN pg_class r ON r.oid = t.typrelid
WHERE n.nspname = $1
  AND (t.typtype IN ('e', 'd', 'r', 'm') OR (t.typtype = 'c' AND r.relkind = 'c'))
ORDER BY t.typname
"""

_SEQUENCES = """
SELECT quote_ident(c.relname) AS name, format_type(s.seqtypid, NULL) AS type, s.seqstart AS start,
       s.seqincrement AS increment,
       (SELECT quote_ident(t.relname) || '.' || quote_ident(a.attname)
        FROM pg_depend d
        JOIN pg_class t ON t.oid = d.refobjid
        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
          AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')) AS owned_by
FROM pg_sequence s
JOIN pg_class c ON c.oid = s.seqrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1
ORDER BY c.relname
"""

_TABLES = """
SELECT c.relname AS table_name, quote_ident(c.relname) AS name, c.relkind::text AS kind,
       coalesce(array_to_string(c.reloptions, ', '), '') AS options,
       CASE WHEN c.relkind = 'p' THEN pg_get_partkeydef(c.oid) END AS partition_key
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
ORDER BY c.relname
"""

# attnum is the column's place in its table (ADD COLUMN appends), the same on every replay.
_COLUMNS = """
SELECT c.relname AS table_name, quote_ident(a.attname) AS name,
       format_type(a.atttypid, a.atttypmod) AS type,
       a.attnotnull AS not_null, pg_get_expr(d.adbin, d.adrelid) AS default_expr,
       a.attidentity::text AS identity, a.attgenerated::text AS generated
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE n.nspname = $1 AND c.relkind IN ('r', 'p') AND NOT c.relispartition
  AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY c.relname, a.attnum
"""

# Not-null constraints (contype 'n', PostgreSQL 18+) are shown on their columns.
_CONSTRAINTS = """
SELECT c.relname AS table_name, quote_ident(k.conname) AS name,
       pg_get_constraintdef(k.oid) AS definition
FROM pg_constraint k
JOIN pg_class c ON c.oid = k.conrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND k.contype IN ('p', 'u', 'f', 'c', 'x') AND NOT c.relispartition
ORDER BY c.relname, CASE k.contype WHEN 'p' THEN 0 WHEN 'u' THEN 1 WHEN 'x' THEN 2
                                   WHEN 'f' THEN 3 ELSE 4 END, k.conname
"""

# The indexes behind a primary key, unique or exclusion constraint are the constraints above.
_INDEXES = """
SELECT t.relname AS table_name, i.relname AS name, pg_get_indexdef(x.indexrelid) AS definition
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
JOIN pg_namespace n ON n.oid = t.relnamespace
WHERE n.nspname = $1 AND NOT t.relispartition
  AND NOT EXISTS (SELECT 1 FROM pg_constraint k
                  WHERE k.conindid = x.indexrelid AND k.conrelid = x.indrelid
                    AND k.contype IN ('p', 'u', 'x'))
ORDER BY t.relname, i.relname
"""

_VIEWS = """
SELECT quote_ident(c.relname) AS name, c.relkind::text AS kind,
       pg_get_viewdef(c.oid, true) AS definition
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind IN ('v', 'm')
ORDER BY c.relname
"""

_TRIGGERS = """
SELECT pg_get_triggerdef(g.oid, true) AS definition
FROM pg_trigger g
JOIN pg_class c ON c.oid = g.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND NOT g.tgisinternal AND NOT c.relispartition
ORDER BY c.relname, g.tgname
"""

_FUNCTIONS = """
SELECT p.proname AS name, pg_get_function_identity_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result, pg_get_functiondef(p.oid) AS definition
FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = $1 AND p.prokind IN ('f', 'p')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d
                  WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY p.proname, pg_get_function_identity_arguments(p.oid) COLLATE "C"
"""

_MIGRATIONS = "SELECT name FROM schema_migrations ORDER BY name"


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text from the catalogs, got {value!r}")
    return value


def _texts(value: object) -> list[str]:
    if not isinstance(value, list):
        raise TypeError(f"expected a text array from the catalogs, got {value!r}")
    return [_text(v) for v in value]


def _section(title: str, items: Sequence[str]) -> str:
    body = "\n\n".join(items) if items else "-- (none)"
    return f"-- {'-' * 96}\n-- {title}\n-- {'-' * 96}\n\n{body}\n"


async def snapshot(conn: Conn) -> str:
    """The schema of the database behind `conn`, as `schema.sql` holds it."""
    await conn.execute("SET search_path = public, pg_catalog")
    migrations = [_text(r["name"]) for r in await conn.fetch(_MIGRATIONS)]

    extensions = [f"CREATE EXTENSION {_text(r['name'])};" for r in await conn.fetch(_EXTENSIONS)]

    types = []
    for r in await conn.fetch(_TYPES, SCHEMA):
        name, kind = _text(r["name"]), _text(r["kind"])
        if kind == "e":
            labels = ", ".join("'" + v.replace("'", "''") + "'" for v in _texts(r["labels"]))
            types.append(f"CREATE TYPE {name} AS ENUM ({labels});")
        elif kind == "d":
            parts = [f"CREATE DOMAIN {name} AS {_text(r['base'])}"]
            if r["default_expr"] is not None:
                parts.append(f"DEFAULT {_text(r['default_expr'])}")
            if r["not_null"]:
                parts.append("NOT NULL")
            parts += _texts(r["checks"])
            types.append(" ".join(parts) + ";")
        elif kind == "c":
            fields = ",\n".join(f"    {f}" for f in _texts(r["fields"]))
            types.append(f"CREATE TYPE {name} AS (\n{fields}\n);")
        else:
            types.append(f"-- {name}: a range type")

    sequences = []
    for r in await conn.fetch(_SEQUENCES, SCHEMA):
        line = f"CREATE SEQUENCE {_text(r['name'])} AS {_text(r['type'])}"
        if r["start"] != 1:
            line += f" START {int(r['start'])}"
        if r["increment"] != 1:
            line += f" INCREMENT {int(r['increment'])}"
        if r["owned_by"] is not None:
            line += f" OWNED BY {_text(r['owned_by'])}"
        sequences.append(line + ";")

    columns: dict[str, list[tuple[str, str]]] = {}
    for r in await conn.fetch(_COLUMNS, SCHEMA):
        columns.setdefault(_text(r["table_name"]), []).append(_column(r))
    constraints: dict[str, list[str]] = {}
    for r in await conn.fetch(_CONSTRAINTS, SCHEMA):
        constraints.setdefault(_text(r["table_name"]), []).append(
            f"CONSTRAINT {_text(r['name'])} {_text(r['definition'])}"
        )
    indexes: dict[str, list[str]] = {}
    for r in await conn.fetch(_INDEXES, SCHEMA):
        indexes.setdefault(_text(r["table_name"]), []).append(_text(r["definition"]) + ";")

    tables = []
    for r in await conn.fetch(_TABLES, SCHEMA):
        key = _text(r["table_name"])
        cols = columns.get(key, [])
        width = max((len(name) for name, _ in cols), default=0)
        lines = [f"{name.ljust(width)} {rest}" for name, rest in cols]
        body = ",\n".join(f"    {line}" for line in lines + constraints.get(key, []))
        options = _text(r["options"])
        table = f"CREATE TABLE {_text(r['name'])} (\n{body}\n)"
        if _text(r["kind"]) == "p":
            table += f" PARTITION BY {_text(r['partition_key'])}"
        table += f" WITH ({options});" if options else ";"
        tables.append("\n".join([table, *indexes.get(key, [])]))

    views = []
    for r in await conn.fetch(_VIEWS, SCHEMA):
        what = "MATERIALIZED VIEW" if _text(r["kind"]) == "m" else "VIEW"
        views.append(f"CREATE {what} {_text(r['name'])} AS\n{_text(r['definition']).rstrip()}")

    triggers = [_text(r["definition"]) + ";" for r in await conn.fetch(_TRIGGERS, SCHEMA)]

    signatures, functions = [], []
    for r in await conn.fetch(_FUNCTIONS, SCHEMA):
        signature = f"{_text(r['name'])}({_text(r['arguments'])}) -> {_text(r['result'])}"
        signatures += textwrap.wrap(
            signature, width=100, initial_indent="--   ", subsequent_indent="--       "
        )
        functions.append(_text(r["definition"]).rstrip() + ";")

    major = int(await conn.fetchval("SHOW server_version_num")) // 10000
    header = [
        "-- The database schema after every migration, generated from the catalogs of a freshly",
        "-- migrated database (scheduler/store/schema.py). Do not edit: after adding or changing",
        "-- a migration, regenerate it with",
        f"--     {REGENERATE}",
        "-- tests/integration/test_schema_snapshot.py fails when it is out of date.",
        "--",
        f"-- PostgreSQL {major} (the catalogs print some expressions differently from one major",
        "-- version to another).",
        "--",
        "-- Migrations:",
        *(f"--   {name}" for name in migrations or ["(none)"]),
        "--",
        "-- Functions:",
        *(signatures or ["--   (none)"]),
        "",
    ]
    return "\n".join(
        [
            "\n".join(header),
            _section("Extensions", extensions),
            _section("Types", types),
            _section("Sequences", sequences),
            _section("Tables, each with its indexes", tables),
            _section("Views", views),
            _section("Triggers", triggers),
            _section("Functions", functions),
        ]
    )


def _column(r: asyncpg.Record) -> tuple[str, str]:
    """A column's quoted name, and its type, default, identity and nullability."""
    rest = _text(r["type"])
    default, identity, generated = r["default_expr"], _text(r["identity"]), _text(r["generated"])
    if generated == "s":
        rest += f" GENERATED ALWAYS AS ({_text(default)}) STORED"
    elif generated == "v":
        rest += f" GENERATED ALWAYS AS ({_text(default)}) VIRTUAL"
    elif default is not None:
        rest += f" DEFAULT {_text(default)}"
    if identity == "a":
        rest += " GENERATED ALWAYS AS IDENTITY"
    elif identity == "d":
        rest += " GENERATED BY DEFAULT AS IDENTITY"
    if r["not_null"]:
        rest += " NOT NULL"
    return _text(r["name"]), rest


async def migrated_snapshot(server_url: str) -> str:
    """Migrate a new scratch database on the server of `server_url`; its `snapshot`."""
    async with scratch_database(server_url) as url:
        async with Store.open(url, max_size=1) as store:
            await store.migrate()
        conn = await asyncpg.connect(url)
        try:
            return await snapshot(conn)
        finally:
            await conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scheduler.store.schema",
        description=f"Print the schema after every migration. Regenerate with: {REGENERATE}",
    )
    parser.add_argument(
        "--server",
        metavar="URL",
        help="an existing PostgreSQL server (a scratch database is made on it and dropped); "
        "default: a temporary embedded one",
    )
    args = parser.parse_args(argv)
    if args.server:
        text = asyncio.run(migrated_snapshot(args.server))
    else:
        from scheduler.store.embedded import temporary_embedded

        with temporary_embedded(prefix="reminders-schema-") as server_url:
            text = asyncio.run(migrated_snapshot(server_url))
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
