"""The reads behind the engagement figures (docs/engagement.md): what each delivery led to.

One named query counts a plan's deliveries by (plan version, step, variant, local day, age) with
how many WeChat accepted (sent), said it delivered, the user opened (through the `rmd` delivery
id), and the user cancelled after (a cancellation attributed to it). Every count is per delivery,
so the groups add up: `scheduler.domain.engagement` sums them into windows, days, steps or
variants without another round trip. A delivery's time is its due time, as in the status
outcome counts; an open or a cancellation counts for the delivery it is attributed to, whenever
it arrived.

Sent, delivered and opened come from the engagement counts (migration 016): per due quarter
hour, with the quarters that hold an edge of the question read from the ledger row by row
(`engagement_sent_v1`), so they cost the same at any ledger size and are exact. Cancellations
come from the consent history and are joined to the deliveries they are attributed to.

Attribution (the rule lives here, in SQL, and only here): a cancellation is a consent event of
the template that is a reject or a ban (in a popup, or the settings switch turned off) or
WeChat's 43101 answer to a send; it belongs to the user's last delivery of that template, in any
plan, WeChat accepted and did not report undelivered, due at most `window` before it. Its time is
when the reporter says it happened (`occurred_at`); a 43101's is the due time of the send that
got it. A popup choice reported twice (the backend and WeChat's push, `corroborates`) counts once,
and a delivery counts as cancelled at most once however many cancellations point at it.

The engagement guard (`scheduler.app.engagement_guard`) reads the same attribution through
`guard_counts`: a plan's recent and baseline deliveries per step, leaving out the spans its
earlier automatic pauses judged (their audit rows, `judged_spans`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from scheduler.errors import StoreError


class UnknownZone(StoreError):
    """PostgreSQL does not know the time zone the days were asked in."""


# The attribution rule, shared by the queries below: the plan's cancellations (`cancellations`)
# and the deliveries they are attributed to (`attributed`). Parameters: $1 plan, $2 from (NULL:
# the beginning), $3 to (exclusive; NULL: no end), $5 the attribution window.
ATTRIBUTION = """
cancellations AS (
    SELECT e.user_id, e.template_id,
           CASE WHEN e.result = 'exhausted'
                THEN coalesce((SELECT f.due_at FROM deliveries f WHERE f.id = e.delivery_id),
                              e.occurred_at)
                ELSE e.occurred_at END AS at
    FROM consent_events e
    -- an array computed once, so that the index on (template_id, occurred_at) serves
    WHERE e.template_id = ANY (ARRAY(SELECT DISTINCT v.definition -> 'template' ->> 'id'
                                     FROM plan_versions v WHERE v.plan_id = $1))
      AND e.result IN ('reject', 'ban', 'exhausted') AND e.corroborates IS NULL
      AND (e.result <> 'exhausted' OR e.source = 'wechat:43101')
      AND ($2::timestamptz IS NULL OR e.occurred_at >= $2)
), attributed AS (
    SELECT DISTINCT last.id
    FROM cancellations c
    CROSS JOIN LATERAL (
        SELECT d.id, d.plan_id
        FROM deliveries d
        JOIN plan_versions v ON v.plan_id = d.plan_id AND v.version = d.plan_version
        WHERE d.user_id = c.user_id AND d.status = 'sent'
          AND v.definition -> 'template' ->> 'id' = c.template_id
          AND d.due_at <= c.at AND d.due_at > c.at - $5::interval
        ORDER BY d.due_at DESC, d.id DESC
        LIMIT 1
    ) AS last
    WHERE last.plan_id = $1
      AND ($3::timestamptz IS NULL OR c.at < $3 + $5::interval)
)"""

# The plan's deliveries WeChat accepted as counted rows (due_at, plan_version, step, variant,
# sent, delivered, opened, cancelled), exact at every edge in the array that follows in the
# query text (migration 016's engagement_sent_v1), and one row per delivery a cancellation is
# attributed to (`attributed`, from ATTRIBUTION): the readers below filter and group them by
# due time as they would the ledger's own rows.
ACCEPTED_ROWS = (
    ATTRIBUTION
    + """, accepted AS (
    SELECT a.*, 0::bigint AS cancelled FROM engagement_sent_v1($1, (SELECT e FROM edges)) AS a
    UNION ALL
    SELECT d.due_at, d.plan_version, d.step, coalesce(d.variant, 'default'), 0, 0, 0, 1
    FROM deliveries d
    WHERE d.id IN (SELECT id FROM attributed) AND d.plan_id = $1
      AND (d.status = 'sent' OR d.reason = 'push_failed')
)"""
)

# $1 plan, $2 from (NULL: the beginning), $3 to (exclusive; NULL: no end), $4 now (the windows),
# $5 the attribution window, $6 the time zone of the days.
ENGAGEMENT_ROWS = (
    """
WITH edges (e) AS (
    SELECT ARRAY[$2::timestamptz, $3::timestamptz, $4::timestamptz - interval '24 hours',
                 $4::timestamptz - interval '7 days']
),"""
    + ACCEPTED_ROWS
    + """
SELECT plan_version, step, variant, (due_at AT TIME ZONE $6::text)::date AS day,
       CASE WHEN due_at > $4::timestamptz - interval '24 hours' THEN 1
            WHEN due_at > $4::timestamptz - interval '7 days' THEN 7
            ELSE 0 END AS age,
       sum(sent)::bigint AS sent, sum(delivered)::bigint AS delivered,
       sum(opened)::bigint AS opened, sum(cancelled)::bigint AS cancelled
FROM accepted
WHERE ($2::timestamptz IS NULL OR due_at >= $2) AND ($3::timestamptz IS NULL OR due_at < $3)
GROUP BY 1, 2, 3, 4, 5
ORDER BY 1, 2, 3, 4, 5
"""
)

# The engagement guard's counts (docs/engagement.md, "The guard"): the plan's deliveries due in
# [$2, $3) WeChat accepted, in the `recent` window from $4 or the `baseline` before it, per plan
# version, step and variant, with how many had a cancellation attributed. Deliveries due in one
# of the spans $6 (what earlier automatic pauses judged) are left out. $5: the attribution window.
# Every window's and span's bound is an edge, so the counts are exact.
GUARD_COUNTS = (
    """
WITH edges (e) AS (
    SELECT ARRAY[$2::timestamptz, $3::timestamptz, $4::timestamptz]
           || ARRAY(SELECT b FROM unnest($6::tstzrange[]) AS r,
                    LATERAL (VALUES (lower(r)), (upper(r))) AS v (b))
),"""
    + ACCEPTED_ROWS
    + """
SELECT due_at >= $4::timestamptz AS recent, plan_version, step, variant,
       sum(sent)::bigint AS sent, sum(cancelled)::bigint AS cancelled
FROM accepted
WHERE due_at >= $2::timestamptz AND due_at < $3::timestamptz
  AND NOT due_at <@ ANY ($6::tstzrange[])
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 3, 4
"""
)

# Active plans with a delivery WeChat accepted due since $1: the ones the guard looks at.
GUARDED_PLANS = """
SELECT p.id FROM plans p
WHERE p.state = 'active'
  AND EXISTS (SELECT 1 FROM deliveries d
              WHERE d.plan_id = p.id AND d.due_at >= $1 AND d.due_at <= $2
                AND (d.status = 'sent' OR d.reason = 'push_failed'))
ORDER BY p.id
"""

# The spans of deliveries earlier automatic pauses of the plan judged (recorded since $2).
JUDGED_SPANS = """
SELECT (details ->> 'judged_from')::timestamptz AS judged_from,
       (details ->> 'judged_to')::timestamptz AS judged_to
FROM plan_events
WHERE plan_id = $1 AND action = 'pause' AND actor = $3 AND recorded_at >= $2
  AND details ? 'judged_from' AND details ? 'judged_to'
ORDER BY id
"""

GUARD_LOCK = 72_410_013  # pg_try_advisory_lock key: one replica runs the guard at a time

PLAN_IDS = "SELECT id FROM plans ORDER BY id"


class EngagementStore:
    """What deliveries led to: sends, deliveries, opens and attributed cancellations (reads)."""

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool

    async def rows(
        self,
        plan_id: str,
        *,
        now: datetime,
        window: timedelta,
        start: datetime | None = None,
        end: datetime | None = None,
        tz: str = "UTC",
    ) -> list[dict[str, Any]]:
        """The plan's deliveries due in [start, end) that WeChat accepted, counted by
        (plan_version, step, variant, day, age): `day` is the due date in `tz`, `age` 1 for due
        in the 24 hours before `now`, 7 for the 7 days before those, 0 older (or not yet due).
        Each row has sent, delivered, opened and cancelled (cancellations attributed within
        `window`, see the module's docstring)."""
        try:
            records = await self._pool.fetch(ENGAGEMENT_ROWS, plan_id, start, end, now, window, tz)
        except asyncpg.InvalidParameterValueError as exc:  # its zone names are not Python's
            raise UnknownZone(f"{tz!r}: PostgreSQL does not know this time zone") from exc
        return [dict(r) for r in records]

    async def plan_ids(self) -> list[str]:
        """Every plan's id."""
        return [r["id"] for r in await self._pool.fetch(PLAN_IDS)]

    async def guard_counts(
        self,
        plan_id: str,
        *,
        since: datetime,
        recent_from: datetime,
        until: datetime,
        window: timedelta,
        leave_out: list[tuple[datetime, datetime]],
    ) -> list[dict[str, Any]]:
        """The plan's deliveries due in [since, until) WeChat accepted, per (recent, plan_version,
        step, variant): `recent` is due at `recent_from` or later; with `sent` and `cancelled`
        (attributed within `window`). Deliveries due in one of the `leave_out` spans (both ends
        included) are not counted."""
        spans = [asyncpg.Range(lower, upper, upper_inc=True) for lower, upper in leave_out]
        records = await self._pool.fetch(
            GUARD_COUNTS, plan_id, since, until, recent_from, window, spans
        )
        return [dict(r) for r in records]

    async def guarded_plans(self, since: datetime, until: datetime) -> list[str]:
        """Active plans with a delivery WeChat accepted due in [since, until]."""
        return [r["id"] for r in await self._pool.fetch(GUARDED_PLANS, since, until)]

    async def judged_spans(
        self, plan_id: str, *, actor: str, since: datetime
    ) -> list[tuple[datetime, datetime]]:
        """The spans of due times the plan's automatic pauses by `actor` recorded since `since`
        judged (their audit rows' `judged_from` and `judged_to`)."""
        rows = await self._pool.fetch(JUDGED_SPANS, plan_id, since, actor)
        return [(r["judged_from"], r["judged_to"]) for r in rows]

    @asynccontextmanager
    async def guard_turn(self) -> AsyncIterator[bool]:
        """Whether this replica runs the guard now: True while it holds the guard's advisory
        lock, False (at once) when another replica is running it."""
        async with self._pool.acquire() as conn:
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", GUARD_LOCK))
            try:
                yield got
            finally:
                if got:
                    await conn.execute("SELECT pg_advisory_unlock($1)", GUARD_LOCK)
