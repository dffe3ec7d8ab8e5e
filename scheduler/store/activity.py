"""What users did: the activity the mini program reports (POST /v1/activity) and, read with it,
their opens (POST /v1/opens), for plans' adapt rules (docs/plans.md#adapt)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from scheduler.domain.adapt import Seen
from scheduler.store.conn import Conn


@dataclass(frozen=True)
class ActivityReport:
    user_id: str
    at: datetime
    event_id: str
    source: str  # who reported it (`api:<token name>`): event ids are unique per source
    kind: str | None = None


class ActivityStore:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def record(self, reports: Sequence[ActivityReport]) -> tuple[int, int]:
        """Store each report once per (source, event id); returns (recorded, duplicates)."""
        rows = await self.pool.fetch(
            "INSERT INTO activity (source, event_id, user_id, at, kind)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],"
            "  $5::text[])"
            " ON CONFLICT DO NOTHING RETURNING event_id",
            [r.source for r in reports],
            [r.event_id for r in reports],
            [r.user_id for r in reports],
            [r.at for r in reports],
            [r.kind for r in reports],
        )
        return len(rows), len(reports) - len(rows)

    async def last_seen(
        self, conn: Conn | None, users: Sequence[str], now: datetime
    ) -> dict[str, Seen]:
        """Each user's last open and last activity (of any plan) up to `now`, in one query for
        the batch; users of whom nothing was reported by then are left out. A report dated
        after `now` (a skewed clock; a simulation's later days) counts from its time on."""
        if not users:
            return {}
        rows = await (conn or self.pool).fetch(
            "SELECT u.uid,"
            " (SELECT o.opened_at FROM opens o WHERE o.user_id = u.uid AND o.opened_at <= $2"
            "  ORDER BY o.opened_at DESC LIMIT 1) AS last_open,"
            " (SELECT a.at FROM activity a WHERE a.user_id = u.uid AND a.at <= $2"
            "  ORDER BY a.at DESC LIMIT 1) AS last_activity"
            " FROM unnest($1::text[]) AS u (uid)",
            list(users),
            now,
        )
        return {
            r["uid"]: Seen(r["last_open"], r["last_activity"])
            for r in rows
            if r["last_open"] is not None or r["last_activity"] is not None
        }
