"""The queries behind plan and enrolment states, opt-outs, catch-ups and the audit trail.

`scheduler.app.lifecycle.Lifecycle` decides (transitions, reasons, what a resume settles) inside
one transaction holding the plan row; every statement it runs is a function here taking that
transaction's connection, so the decisions and their SQL stay in step without a pool in app/.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg

from scheduler.store.conn import Conn
from scheduler.store.control import NOTIFY

__all__ = ["Conn"]  # the connection type of the functions below


class LifecycleStore:
    def __init__(self, pool: asyncpg.Pool, control_channel: str):
        self._pool = pool
        self._channel = control_channel

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            yield conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        async with self._pool.acquire() as conn:
            yield conn

    async def notify(self, conn: Conn, message: dict[str, Any]) -> None:
        """Tell every replica, when (and only if) the transaction commits."""
        await conn.execute(NOTIFY, self._channel, json.dumps(message))

    async def opt_outs(self, user_id: str) -> list[asyncpg.Record]:
        return await self._pool.fetch(
            "SELECT plan_id, actor, reason, created_at FROM opt_outs WHERE user_id = $1"
            " ORDER BY plan_id",
            user_id,
        )

    async def audit(
        self, plan_id: str | None, user_id: str | None, limit: int
    ) -> list[asyncpg.Record]:
        return await self._pool.fetch(
            "SELECT id, recorded_at, plan_id, user_id, action, actor, reason, plan_version,"
            " details FROM plan_events"
            " WHERE ($1::text IS NULL OR plan_id = $1) AND ($2::text IS NULL OR user_id = $2)"
            " ORDER BY id DESC LIMIT $3",
            plan_id,
            user_id,
            limit,
        )


# --- a plan's state -------------------------------------------------------------------------------


async def locked_plan(conn: Conn, plan_id: str) -> asyncpg.Record | None:
    """The plan's state and current definition, its row locked until the transaction ends.

    Locked first, then read: had one statement locked and read the row, a plan-file load that
    held the row meanwhile (a new current version) would make PostgreSQL re-check the updated
    row against the version rows of the statement's older snapshot, match none, and return
    nothing: a loaded plan read as unknown. The read after the lock sees what the load wrote."""
    if await conn.fetchval("SELECT 1 FROM plans WHERE id = $1 FOR UPDATE", plan_id) is None:
        return None
    return await conn.fetchrow(
        "SELECT p.state, p.state_reason, p.current_version, p.paused_at,"
        " p.registered_at, v.definition FROM plans p"
        " JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
        " WHERE p.id = $1",
        plan_id,
    )


async def set_state(
    conn: Conn, plan_id: str, state: str, reason: str | None, now: datetime
) -> None:
    await conn.execute(
        "UPDATE plans SET state = $2, state_reason = $3, updated_at = now(),"
        " paused_at = CASE WHEN $2 = 'paused' THEN $4::timestamptz END WHERE id = $1",
        plan_id,
        state,
        reason,
        now,
    )


async def plan_version(conn: Conn, plan_id: str) -> int | None:
    version: int | None = await conn.fetchval(
        "SELECT current_version FROM plans WHERE id = $1", plan_id
    )
    return version


def _count(status: str) -> int:
    return int(status.split()[-1])


async def skip_cancelled(conn: Conn, plan_id: str) -> tuple[int, int]:
    """A cancel ends the plan's deferred sends and the rows given back to the pool (claimed
    once, never sent, after a crash): both `skipped` (`cancelled`). Returns (deferred, given
    back)."""
    deferred = await conn.execute(
        "UPDATE deliveries SET status = 'skipped', reason = 'cancelled',"
        " defer_until = NULL, finished_at = now()"
        " WHERE plan_id = $1 AND status = 'deferred'",
        plan_id,
    )
    released = await conn.execute(
        "UPDATE deliveries SET status = 'skipped', reason = 'cancelled', finished_at = now()"
        " WHERE plan_id = $1 AND status = 'pending' AND claimed_by IS NULL",
        plan_id,
    )
    return _count(deferred), _count(released)


# --- what a resume settles --------------------------------------------------------------------


async def stopped_midway(conn: Conn, plan_id: str, occurrence: str) -> bool:
    """Whether the occurrence was fanned out to some of the active enrolments but not all."""
    found: bool = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM deliveries WHERE plan_id = $1 AND occurrence = $2)"
        " AND EXISTS (SELECT 1 FROM enrollments e WHERE e.plan_id = $1"
        "  AND e.status = 'active' AND NOT EXISTS (SELECT 1 FROM deliveries d"
        "   WHERE d.plan_id = $1 AND d.occurrence = $2 AND d.user_id = e.user_id))",
        plan_id,
        occurrence,
    )
    return found


async def queue_catch_up(conn: Conn, plan_id: str, fire_time: datetime) -> None:
    await conn.execute(
        "INSERT INTO catch_up (plan_id, fire_time) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        plan_id,
        fire_time,
    )


async def take_catch_ups(conn: Conn, plan_id: str) -> list[datetime]:
    """Remove the plan's queued catch-ups; returns their fire times."""
    rows = await conn.fetch("DELETE FROM catch_up WHERE plan_id = $1 RETURNING fire_time", plan_id)
    return [r["fire_time"] for r in rows]


# The first key of the advisory locks that say which replica fans out a queued catch-up (the
# second is a hash of the plan and fire time): pg_try_advisory_lock(int4, int4).
CATCH_UP_LOCK = 72_410_003
_CATCH_UP_KEY = "$1::int, hashtext($2 || '@' || extract(epoch FROM $3::timestamptz)::text)"


async def claim_catch_up(conn: Conn) -> asyncpg.Record | None:
    """The oldest queued catch-up of an active plan that no other replica is fanning out, held
    by an advisory lock of `conn`'s session until `release_catch_up` (or the connection goes
    back to the pool, which unlocks everything). `conn` must not be in a transaction: the fan-out
    runs on other connections, and a row lock kept across it made a pause, resume or cancel of
    the plan (which remove its queued catch-ups) wait for the fan-out, whose next batch waited
    for the plan row that action held. The advisory lock blocks nobody; a catch-up removed
    meanwhile is simply not found by `catch_up_done`."""
    candidates = await conn.fetch(
        "SELECT c.plan_id, c.fire_time FROM catch_up c JOIN plans p ON p.id = c.plan_id"
        " WHERE p.state = 'active' ORDER BY c.fire_time"
    )
    for row in candidates:
        key = (CATCH_UP_LOCK, row["plan_id"], row["fire_time"])
        if not await conn.fetchval(f"SELECT pg_try_advisory_lock({_CATCH_UP_KEY})", *key):
            continue  # another replica fans it out
        still_queued = await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM catch_up c JOIN plans p ON p.id = c.plan_id"
            " WHERE c.plan_id = $1 AND c.fire_time = $2 AND p.state = 'active')",
            row["plan_id"],
            row["fire_time"],
        )
        if still_queued:
            return row
        await conn.execute(f"SELECT pg_advisory_unlock({_CATCH_UP_KEY})", *key)
    return None


async def release_catch_up(conn: Conn, plan_id: str, fire_time: datetime) -> None:
    """Unlock what `claim_catch_up` locked. When that fails (the fan-out was cancelled and the
    connection with it), the pool's reset of the connection unlocks it, or it is closed."""
    with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
        await conn.execute(
            f"SELECT pg_advisory_unlock({_CATCH_UP_KEY})", CATCH_UP_LOCK, plan_id, fire_time
        )


async def catch_up_done(conn: Conn, plan_id: str, fire_time: datetime) -> None:
    await conn.execute(
        "DELETE FROM catch_up WHERE plan_id = $1 AND fire_time = $2", plan_id, fire_time
    )


async def overdue_enrolments(conn: Conn, plan_id: str, now: datetime) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT user_id, tz, start_at, next_step, next_due_at FROM enrollments"
        " WHERE plan_id = $1 AND status = 'active' AND next_due_at <= $2 FOR UPDATE",
        plan_id,
        now,
    )


async def record_for_audience(
    conn: Conn,
    plan_id: str,
    version: int,
    occurrence: str,
    step: int,
    due_at: datetime,
    status: str,
    reason: str,
) -> int:
    """One final row per active enrolment that has none for this occurrence yet."""
    done = await conn.execute(
        "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
        " status, reason, claimed_by, finished_at, key_at)"
        " SELECT $1, $2, $3, e.user_id, $4, $5, $6, $7, 'resume', now(), ledger_key_at($3, $5)"
        " FROM enrollments e WHERE e.plan_id = $1 AND e.status = 'active'"
        " ON CONFLICT (plan_id, occurrence, user_id, key_at) DO NOTHING",
        plan_id,
        version,
        occurrence,
        step,
        due_at,
        status,
        reason,
    )
    return _count(done)


# --- users ------------------------------------------------------------------------------------


async def opt_out_of(conn: Conn, user_id: str, scope: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT actor, reason, created_at FROM opt_outs"
        " WHERE user_id = $1 AND plan_id = $2 FOR UPDATE",
        user_id,
        scope,
    )


async def add_opt_out(conn: Conn, user_id: str, scope: str, actor: str, reason: str | None) -> None:
    await conn.execute(
        "INSERT INTO opt_outs (user_id, plan_id, actor, reason) VALUES ($1, $2, $3, $4)",
        user_id,
        scope,
        actor,
        reason,
    )


async def remove_opt_out(conn: Conn, user_id: str, scope: str) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM opt_outs WHERE user_id = $1 AND plan_id = $2 RETURNING 1", user_id, scope
    )
    return bool(deleted)


async def enrolment_status(conn: Conn, plan_id: str, user_id: str) -> str | None:
    """The enrolment's status, its row locked until the transaction ends."""
    status: str | None = await conn.fetchval(
        "SELECT status FROM enrollments WHERE plan_id = $1 AND user_id = $2 FOR UPDATE",
        plan_id,
        user_id,
    )
    return status


async def stop_enrolment(conn: Conn, plan_id: str, user_id: str) -> None:
    await conn.execute(
        "UPDATE enrollments SET status = 'stopped', updated_at = now()"
        " WHERE plan_id = $1 AND user_id = $2",
        plan_id,
        user_id,
    )


# --- the audit trail ----------------------------------------------------------------------------


async def add_event(
    conn: Conn,
    *,
    plan_id: str | None,
    user_id: str | None,
    action: str,
    actor: str,
    reason: str | None,
    version: int | None,
    details: dict[str, Any] | None,
    at: datetime,
) -> asyncpg.Record:
    """Append one audit row; returns its id and recorded_at."""
    row = await conn.fetchrow(
        "INSERT INTO plan_events"
        " (plan_id, user_id, action, actor, reason, plan_version, details, recorded_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id, recorded_at",
        plan_id,
        user_id,
        action,
        actor,
        reason,
        version,
        details,
        at,
    )
    assert row is not None  # INSERT ... RETURNING returns the row it inserted
    return row
