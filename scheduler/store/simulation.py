"""The reads `reminders simulate` makes between moments of virtual time, and its one write.

The simulation drives the real dispatcher on a database of its own (`scheduler.store.scratch`);
these queries find the next moment worth moving the clock to, the ledger rows of its sends (for
the simulated users' opens and cancellations) and read the ledger it left.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

REGISTER_ALL_AT = "UPDATE plans SET registered_at = $1"
NEXT_RELATIVE_DUE = (
    "SELECT min(next_due_at) FROM enrollments WHERE status = 'active'"
    " AND plan_id = ANY($1) AND next_due_at > $2 AND next_due_at < $3"
)
NEXT_DEFERRED_RETRY = (
    "SELECT min(defer_until) FROM deliveries WHERE status = 'deferred' AND defer_until > $1"
)
DEFERRED = "SELECT id, reason, defer_until FROM deliveries WHERE status = 'deferred'"
LEDGER = (
    "SELECT id, plan_id, user_id, step, due_at, status, reason, variant FROM deliveries"
    " ORDER BY due_at, plan_id, user_id, occurrence"
)
SENT_BY_MSGID = (
    "SELECT id, plan_id, user_id, step, due_at, msgid FROM deliveries"
    " WHERE msgid = ANY($1::bigint[])"
    " ORDER BY id"
)
ACTIVE_ENROLMENTS = (
    "SELECT user_id, start_at, tz, next_step FROM enrollments"
    " WHERE plan_id = $1 AND status = 'active' ORDER BY user_id"
)
UNFINISHED = (
    "SELECT plan_id, user_id, occurrence, due_at, status, reason, defer_until"
    " FROM deliveries WHERE status IN ('pending', 'deferred') ORDER BY plan_id, user_id"
)


class SimulationStore:
    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def register_all_at(self, moment: datetime) -> None:
        """Stamp every plan as registered at `moment` (the store stamps the real clock; a
        calendar plan without a start date counts its steps from it)."""
        await self._pool.execute(REGISTER_ALL_AT, moment)

    async def next_relative_due(
        self, plan_ids: Sequence[str], after: datetime, before: datetime
    ) -> datetime | None:
        """The earliest next step of an active enrolment in `plan_ids` in (after, before)."""
        due: datetime | None = await self._pool.fetchval(
            NEXT_RELATIVE_DUE, list(plan_ids), after, before
        )
        return due

    async def next_deferred_retry(self, after: datetime) -> datetime | None:
        """The earliest moment after `after` a deferred send is to be tried again."""
        retry: datetime | None = await self._pool.fetchval(NEXT_DEFERRED_RETRY, after)
        return retry

    async def deferred(self) -> list[dict[str, Any]]:
        """Every deferred ledger row now: id, reason, defer_until."""
        return [dict(r) for r in await self._pool.fetch(DEFERRED)]

    async def ledger(self) -> list[dict[str, Any]]:
        """Every ledger row (id, plan_id, user_id, step, due_at, status, reason, variant), by due
        time, plan and user."""
        return [dict(r) for r in await self._pool.fetch(LEDGER)]

    async def sent_by_msgid(self, msgids: Sequence[int]) -> list[dict[str, Any]]:
        """The ledger rows of the sends WeChat answered with `msgids`: id, plan_id, user_id,
        step, due_at, msgid (by id)."""
        return [dict(r) for r in await self._pool.fetch(SENT_BY_MSGID, list(msgids))]

    async def active_enrolments(self, plan_id: str) -> list[dict[str, Any]]:
        """The plan's active enrolments: user_id, start_at, tz, next_step (by user)."""
        return [dict(r) for r in await self._pool.fetch(ACTIVE_ENROLMENTS, plan_id)]

    async def unfinished(self) -> list[dict[str, Any]]:
        """Ledger rows still pending or deferred, by plan and user."""
        return [dict(r) for r in await self._pool.fetch(UNFINISHED)]
