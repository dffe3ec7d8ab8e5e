"""The plans folder's side of the database: which file each running plan came from, and the
problems of the files that do not validate (shown by `reminders status` until they are fixed).
The watcher (scheduler/app/watcher.py) decides; this module only reads and writes."""

from __future__ import annotations

from typing import Any

import asyncpg

OWNERS = (
    "SELECT p.id, v.source_file FROM plans p"
    " JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
    " WHERE v.source_file IS NOT NULL"
)
RUNNING = (
    "SELECT p.id, p.state, p.state_reason, v.source_file FROM plans p"
    " JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
)
PLAN_OF_FILE = (
    "SELECT plan_id FROM plan_versions WHERE source_file = $1 ORDER BY loaded_at DESC LIMIT 1"
)
PROBLEMS_OF_FILE = "SELECT problems FROM plan_problems WHERE source_file = $1"
RECORD_PROBLEMS = (
    "INSERT INTO plan_problems (source_file, plan_id, problems) VALUES ($1, $2, $3)"
    " ON CONFLICT (source_file) DO UPDATE SET plan_id = $2, problems = $3, last_seen = now(),"
    " first_seen = CASE WHEN plan_problems.problems = $3"
    "  THEN plan_problems.first_seen ELSE now() END"
)
FILES_WITH_PROBLEMS = "SELECT source_file FROM plan_problems"
CLEAR_PROBLEMS = "DELETE FROM plan_problems WHERE source_file = $1"


class PlanFilesStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def owners(self) -> dict[str, str]:
        """Plan id -> the file its running version came from (which keeps the id)."""
        return {r["id"]: r["source_file"] for r in await self._pool.fetch(OWNERS)}

    async def current_versions(self) -> list[dict[str, Any]]:
        """Every plan's id, state, state reason and the file of its current version."""
        return [dict(r) for r in await self._pool.fetch(RUNNING)]

    async def plan_of_file(self, file: str) -> str | None:
        """The plan a file last loaded as, if it ever loaded."""
        plan_id: str | None = await self._pool.fetchval(PLAN_OF_FILE, file)
        return plan_id

    async def record_problems(
        self, file: str, plan_id: str | None, problems: list[dict[str, str]]
    ) -> list[dict[str, str]] | None:
        """Record a file's current problems; returns the ones recorded before (None: none)."""
        async with self._pool.acquire() as conn, conn.transaction():
            previous: list[dict[str, str]] | None = await conn.fetchval(PROBLEMS_OF_FILE, file)
            await conn.execute(RECORD_PROBLEMS, file, plan_id, problems)
        return previous

    async def files_with_problems(self) -> list[str]:
        return [r["source_file"] for r in await self._pool.fetch(FILES_WITH_PROBLEMS)]

    async def clear_problems(self, file: str) -> None:
        await self._pool.execute(CLEAR_PROBLEMS, file)
