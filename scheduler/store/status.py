"""The read models behind `reminders status`, the admin API and `reminders health` / `reload`.

Read-only queries, one per question the status reports ask. Each returns plain dicts (or
scalars) keyed as the columns are named, so the reports in `scheduler.app.status` shape them
without knowing the tables. Outcome counts are by due time: "24h" is what was due in the last
24 hours and how it ended. They come from the ledger's counts (migration 010), not from the
ledger itself, and "last errors" from an index of the failed and unknown rows: every read here
costs the same at 100 million ledger rows as at 1,000.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

REPLICA_ALIVE_S = 30  # a replica whose heartbeat is older than this is gone

PING = "SELECT 1"

PLAN = (
    "SELECT p.id, p.state, p.state_reason, p.kind, p.current_version, p.registered_at,"
    " p.paused_at, p.updated_at, v.definition, v.source_file, v.loaded_at,"
    " (SELECT count(*) FROM plan_versions w WHERE w.plan_id = p.id) AS versions"
    " FROM plans p JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
    " WHERE p.id = $1"
)
LAST_STATE_CHANGE = (
    "SELECT action, actor, reason, recorded_at FROM plan_events"
    " WHERE plan_id = $1 AND action = ANY ($2::text[]) ORDER BY id DESC LIMIT 1"
)
UPCOMING_STEPS = (
    "SELECT next_due_at, count(*) AS users FROM enrollments"
    " WHERE plan_id = $1 AND status = 'active' AND next_due_at > $2"
    " GROUP BY next_due_at ORDER BY next_due_at LIMIT $3"
)
OVERDUE_STEPS = (
    "SELECT count(*) FROM enrollments"
    " WHERE plan_id = $1 AND status = 'active' AND next_due_at <= $2"
)
CATCH_UP_QUEUED = "SELECT count(*) FROM catch_up WHERE plan_id = $1"
ENROLMENTS_BY_STATUS = (
    "SELECT status, count(*) AS n FROM enrollments WHERE plan_id = $1 GROUP BY status"
)
OUTCOME_COUNTS = (
    "SELECT status, reason, sum(d1)::bigint AS d1, sum(d7)::bigint AS d7,"
    " sum(total)::bigint AS total FROM delivery_outcomes_v1($1, $2)"
    " GROUP BY status, reason ORDER BY status, reason NULLS FIRST"
)
LAST_ERRORS = (
    "SELECT coalesce(finished_at, claimed_at) AS at, user_id, occurrence, status, reason,"
    " errcode, detail, plan_version FROM deliveries"
    " WHERE plan_id = $1 AND status IN ('failed', 'unknown') ORDER BY id DESC LIMIT $2"
)
FILE_PROBLEMS_OF_PLAN = (
    "SELECT source_file, problems, first_seen, last_seen FROM plan_problems"
    " WHERE plan_id = $1 OR source_file = $2 ORDER BY source_file"
)
REPLICAS = (
    "SELECT id, host, pid, started_at,"
    " CASE WHEN last_seen = '-infinity' THEN NULL ELSE last_seen END AS last_seen,"
    " last_seen > now() - make_interval(secs => $1) AS alive"
    " FROM replicas WHERE last_seen > now() - interval '1 day' OR last_seen = '-infinity'"
    " ORDER BY alive DESC, id"
)
REPLICA_ALIVE = "SELECT last_seen > now() - make_interval(secs => $2) FROM replicas WHERE id = $1"
LIVE_REPLICA_COUNT = (
    "SELECT count(*) FROM replicas WHERE last_seen > now() - make_interval(secs => $1)"
)
PLANS = (
    "SELECT p.id, p.state, p.state_reason, p.current_version, p.registered_at, v.definition"
    " FROM plans p JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
    " ORDER BY p.id"
)
OUTCOME_COUNTS_PER_PLAN = (
    "SELECT plan_id, status, sum(d1)::bigint AS d1, sum(d7)::bigint AS d7,"
    " sum(total)::bigint AS total FROM delivery_outcomes_v1(NULL, $1) GROUP BY plan_id, status"
)
ROLL_UP_COUNTS = "SELECT roll_up_delivery_counts_v1()"
ACTIVE_ENROLMENTS_PER_PLAN = (
    "SELECT plan_id, count(*) AS n FROM enrollments WHERE status = 'active' GROUP BY plan_id"
)
FILE_PROBLEMS = "SELECT source_file, plan_id, problems, first_seen FROM plan_problems ORDER BY 1"
# Each plan's newest errors from the partial index deliveries_errors (plan_id, id), then the
# newest of those: no walk over the ledger.
LAST_ERRORS_ANYWHERE = (
    "SELECT e.* FROM plans p, LATERAL ("
    " SELECT d.id, d.plan_id, coalesce(d.finished_at, d.claimed_at) AS at, d.user_id,"
    "  d.occurrence, d.status, d.reason, d.errcode, d.detail FROM deliveries d"
    " WHERE d.plan_id = p.id AND d.status IN ('failed', 'unknown')"
    " ORDER BY d.id DESC LIMIT $1) AS e"
    " ORDER BY e.id DESC LIMIT $1"
)
# Credits are capped at 1: whether the next send is covered asks only if one is left.
CONSENT_OF_ACTIVE_ENROLMENTS = (
    "SELECT e.plan_id, least(coalesce(c.credits, 0), 1) AS credits,"
    " coalesce(c.long_term, false) AS long_term, coalesce(c.banned, false) AS banned,"
    " count(*) AS n"
    " FROM enrollments e"
    " JOIN plans p ON p.id = e.plan_id"
    " JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
    " LEFT JOIN consent c"
    "  ON c.user_id = e.user_id AND c.template_id = v.definition -> 'template' ->> 'id'"
    " WHERE e.status = 'active' GROUP BY 1, 2, 3, 4"
)
FIRST_DUE_STEP = "SELECT min(next_due_at) FROM enrollments WHERE plan_id = $1 AND status = 'active'"


class StatusStore:
    """What plans, the ledger, enrolments and replicas look like now (reads only)."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def ping(self) -> None:
        """One round trip: raises when the database does not answer."""
        await self._pool.fetchval(PING)

    # --- one plan -------------------------------------------------------------------------------

    async def plan(self, plan_id: str) -> dict[str, Any] | None:
        """The plan row with its current version's definition, source file and load time, and
        how many versions it has had; None when no such plan is loaded."""
        row = await self._pool.fetchrow(PLAN, plan_id)
        return dict(row) if row is not None else None

    async def last_state_change(
        self, plan_id: str, actions: Sequence[str]
    ) -> dict[str, Any] | None:
        """The newest audit event of the plan among `actions` (action, actor, reason,
        recorded_at), or None."""
        row = await self._pool.fetchrow(LAST_STATE_CHANGE, plan_id, list(actions))
        return dict(row) if row is not None else None

    async def upcoming_steps(self, plan_id: str, now: datetime, limit: int) -> list[dict[str, Any]]:
        """A relative plan's next `limit` due times after `now` with how many active enrolments
        are due at each (next_due_at, users)."""
        return [dict(r) for r in await self._pool.fetch(UPCOMING_STEPS, plan_id, now, limit)]

    async def overdue_steps(self, plan_id: str, now: datetime) -> int:
        """Active enrolments of the plan whose next step is due at or before `now`."""
        overdue: int = await self._pool.fetchval(OVERDUE_STEPS, plan_id, now)
        return overdue

    async def catch_up_queued(self, plan_id: str) -> int:
        """Occurrences a resume queued for catching up and not yet fanned out."""
        queued: int = await self._pool.fetchval(CATCH_UP_QUEUED, plan_id)
        return queued

    async def enrolments_by_status(self, plan_id: str) -> dict[str, int]:
        """The plan's enrolments counted by status."""
        return {r["status"]: r["n"] for r in await self._pool.fetch(ENROLMENTS_BY_STATUS, plan_id)}

    async def roll_up(self) -> int:
        """Fold the ledger's count deltas into its counts (the daemon does it every sweep
        period; reads are exact either way, this keeps them short). Returns how many deltas it
        folded, or -1 when another roll-up was running (it does not wait for it)."""
        folded: int = await self._pool.fetchval(ROLL_UP_COUNTS)
        return folded

    async def outcome_counts(self, plan_id: str | None, now: datetime) -> list[dict[str, Any]]:
        """Ledger rows due by `now` by (status, reason): d1 / d7 due in the last 24 hours / 7 days,
        total all of them; for one plan, or all plans when `plan_id` is None."""
        await self.roll_up()
        return [dict(r) for r in await self._pool.fetch(OUTCOME_COUNTS, plan_id, now)]

    async def last_errors(self, plan_id: str, limit: int) -> list[dict[str, Any]]:
        """The plan's newest `limit` failed or unknown sends, newest first (`at`: when they
        finished, or were claimed when they never finished)."""
        return [dict(r) for r in await self._pool.fetch(LAST_ERRORS, plan_id, limit)]

    async def file_problems_of(self, plan_id: str, source_file: str | None) -> list[dict[str, Any]]:
        """Rejected plan files of this plan, or at its source file, by file name."""
        rows = await self._pool.fetch(FILE_PROBLEMS_OF_PLAN, plan_id, source_file)
        return [dict(r) for r in rows]

    async def first_due_step(self, plan_id: str) -> datetime | None:
        """The earliest next step of the plan's active enrolments (None: nobody is enrolled)."""
        first: datetime | None = await self._pool.fetchval(FIRST_DUE_STEP, plan_id)
        return first

    # --- every plan -----------------------------------------------------------------------------

    async def plans(self) -> list[dict[str, Any]]:
        """Every plan with its current version's definition, by id."""
        return [dict(r) for r in await self._pool.fetch(PLANS)]

    async def outcome_counts_per_plan(self, now: datetime) -> list[dict[str, Any]]:
        """Ledger rows due by `now` by (plan_id, status): d1 / d7 / total as `outcome_counts`."""
        await self.roll_up()
        return [dict(r) for r in await self._pool.fetch(OUTCOME_COUNTS_PER_PLAN, now)]

    async def active_enrolments_per_plan(self) -> dict[str, int]:
        """Active enrolments by plan (plans without any are left out)."""
        return {r["plan_id"]: r["n"] for r in await self._pool.fetch(ACTIVE_ENROLMENTS_PER_PLAN)}

    async def consent_of_active_enrolments(self) -> list[dict[str, Any]]:
        """Active enrolments per plan and consent state of its template (plan_id, credits
        capped at 1, long_term, banned, n)."""
        return [dict(r) for r in await self._pool.fetch(CONSENT_OF_ACTIVE_ENROLMENTS)]

    async def last_errors_anywhere(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` failed or unknown sends of any plan, newest first."""
        return [dict(r) for r in await self._pool.fetch(LAST_ERRORS_ANYWHERE, limit)]

    async def file_problems(self) -> list[dict[str, Any]]:
        """Every rejected plan file (source_file, plan_id, problems, first_seen), by file."""
        return [dict(r) for r in await self._pool.fetch(FILE_PROBLEMS)]

    # --- replicas -------------------------------------------------------------------------------

    async def replicas(self) -> list[dict[str, Any]]:
        """Replicas seen in the last day or stopped cleanly, alive ones first: id, host, pid,
        started_at, last_seen (None: stopped cleanly) and alive."""
        return [dict(r) for r in await self._pool.fetch(REPLICAS, REPLICA_ALIVE_S)]

    async def replica_alive(self, replica_id: str) -> bool:
        """Whether this replica's heartbeat is recent (False too when it never ran)."""
        return bool(await self._pool.fetchval(REPLICA_ALIVE, replica_id, REPLICA_ALIVE_S))

    async def live_replica_count(self) -> int:
        """How many replicas have a recent heartbeat."""
        live: int = await self._pool.fetchval(LIVE_REPLICA_COUNT, REPLICA_ALIVE_S)
        return live
