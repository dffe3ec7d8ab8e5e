"""SQL lives only under `scheduler/store/` (issue 11): the rest of the code talks to the store's
ports (`scheduler/store/abc.py`) and never holds a pool or a connection."""

from __future__ import annotations

import re
from pathlib import Path

import scheduler

PACKAGE = Path(scheduler.__file__).parent
STORE = PACKAGE / "store"

# Modules allowed to break the rule: none any more. It must stay empty.
ALLOWLIST: set[str] = set()

# Uppercase keywords only: prose ("select from the list") is not a statement.
SQL = re.compile(
    r"\bSELECT\b.{0,200}?\bFROM\b"
    r"|\bINSERT\s+INTO\b"
    r"|\bUPDATE\s+\w+\s+SET\b"
    r"|\bDELETE\s+FROM\b"
    r"|\bpg_notify\b"
    r"|\b(?:UN)?LISTEN\s+\w",
    re.DOTALL,  # a statement spans the string literals it is written in
)
DRIVER = re.compile(
    r"\.pool\b"
    r"|\.(?:fetch|fetchrow|fetchval|execute|executemany|add_listener)\("
    r"|^\s*(?:import|from)\s+asyncpg\b",
    re.MULTILINE,
)


def _outside_store() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STORE not in p.parents)


def _offences(text: str) -> list[str]:
    found = []
    for pattern in (SQL, DRIVER):
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"line {line}: {match.group(0).strip()!r}")
    return found


def test_no_sql_and_no_pool_outside_the_store():
    offending = {}
    for path in _outside_store():
        name = path.relative_to(PACKAGE.parent).as_posix()
        if name in ALLOWLIST:
            continue
        if found := _offences(path.read_text(encoding="utf-8")):
            offending[name] = found
    assert not offending, f"SQL or database access outside scheduler/store/: {offending}"


def test_the_allowlist_names_existing_files():
    """A stale entry would let a new file of that name in unchecked."""
    missing = sorted(name for name in ALLOWLIST if not (PACKAGE.parent / name).is_file())
    assert not missing, f"not files any more, take them off the ALLOWLIST: {missing}"


def test_the_guard_sees_what_it_is_meant_to_see():
    for statement in (
        '"SELECT id, state FROM plans WHERE id = $1"',
        '"SELECT count(*)"\n        " FROM enrollments"',
        '"INSERT INTO catch_up (plan_id) VALUES ($1)"',
        '"UPDATE plans SET state = $2"',
        '"DELETE FROM opt_outs WHERE user_id = $1"',
        '"SELECT pg_notify($1, $2)"',
        '"LISTEN reminders_control"',
        "async with store.pool.acquire() as conn:",
        'await conn.fetchval("...")',
        "import asyncpg",
    ):
        assert _offences(statement), statement
    for prose in (
        "every replica LISTENs on one channel",
        "one replica takes each; the others skip its locked row",
        "select from the list, then update the plan",
        "await self._slots.acquire()",
    ):
        assert not _offences(prose), prose
