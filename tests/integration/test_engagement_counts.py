"""The engagement counts (migration 016) against the ledger itself: the figures that
`EngagementStore.rows` and `guard_counts` read from the counts, with the quarter hours that hold
an edge read row by row, equal what the previous release's queries computed by reading every
delivery and every open (kept here verbatim as the reference), for random ledgers written
through inserts, updates (results, pushes, deferrals claimed again), deletes and opens, with
deltas not yet folded and after a roll-up, at random edges, spans and time zones (Kolkata and
Kathmandu are not a whole hour off UTC)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from scheduler.store.consent import OpenReport
from scheduler.store.postgres import Store
from tests.support import calendar_plan, register

# --- the reference: the previous release's queries over the ledger and the opens ------------
LEDGER_ATTRIBUTION = """
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

# $1 plan, $2 from (NULL: the beginning), $3 to (exclusive; NULL: no end), $4 now (the windows),
# $5 the attribution window, $6 the time zone of the days.
LEDGER_ENGAGEMENT_ROWS = (
    """
WITH sent AS (
    SELECT d.id, d.plan_version, d.step, coalesce(d.variant, 'default') AS variant,
           (d.due_at AT TIME ZONE $6::text)::date AS day,
           CASE WHEN d.due_at > $4::timestamptz - interval '24 hours' THEN 1
                WHEN d.due_at > $4::timestamptz - interval '7 days' THEN 7
                ELSE 0 END AS age,
           d.push_errcode = 0 AS delivered
    FROM deliveries d
    WHERE d.plan_id = $1 AND (d.status = 'sent' OR d.reason = 'push_failed')
      AND ($2::timestamptz IS NULL OR d.due_at >= $2)
      AND ($3::timestamptz IS NULL OR d.due_at < $3)
),"""
    + LEDGER_ATTRIBUTION
    + """, opened AS (
    SELECT DISTINCT o.delivery_id AS id FROM opens o JOIN sent s ON s.id = o.delivery_id
)
SELECT s.plan_version, s.step, s.variant, s.day, s.age,
       count(*) AS sent,
       count(*) FILTER (WHERE s.delivered) AS delivered,
       count(o.id) AS opened,
       count(a.id) AS cancelled
FROM sent s
LEFT JOIN opened o ON o.id = s.id
LEFT JOIN attributed a ON a.id = s.id
GROUP BY s.plan_version, s.step, s.variant, s.day, s.age
ORDER BY s.plan_version, s.step, s.variant, s.day, s.age
"""
)

# The engagement guard's counts (docs/engagement.md, "The guard"): the plan's deliveries due in
# [$2, $3) WeChat accepted, in the `recent` window from $4 or the `baseline` before it, per plan
# version, step and variant, with how many had a cancellation attributed. Deliveries due in one
# of the spans $6 (what earlier automatic pauses judged) are left out. $5: the attribution window.
LEDGER_GUARD_COUNTS = (
    """
WITH sent AS (
    SELECT d.id, d.plan_version, d.step, coalesce(d.variant, 'default') AS variant,
           d.due_at >= $4::timestamptz AS recent
    FROM deliveries d
    WHERE d.plan_id = $1 AND (d.status = 'sent' OR d.reason = 'push_failed')
      AND d.due_at >= $2::timestamptz AND d.due_at < $3::timestamptz
      AND NOT d.due_at <@ ANY ($6::tstzrange[])
),"""
    + LEDGER_ATTRIBUTION
    + """
SELECT s.recent, s.plan_version, s.step, s.variant, count(*) AS sent, count(a.id) AS cancelled
FROM sent s
LEFT JOIN attributed a ON a.id = s.id
GROUP BY s.recent, s.plan_version, s.step, s.variant
ORDER BY s.recent, s.plan_version, s.step, s.variant
"""
)


# ---------------------------------------------------------------------------------------------

START = datetime(2026, 3, 1, tzinfo=UTC)
ZONES = ["UTC", "Asia/Shanghai", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York"]
WINDOW = timedelta(hours=48)
STATUSES = ["sent"] * 6 + ["failed", "skipped", "pending", "deferred", "unknown"]


def moment(rnd: random.Random) -> datetime:
    """Within 20 days from START, often on a round quarter hour (as fan-outs are)."""
    minutes = rnd.randrange(20 * 24 * 4) * 15
    if rnd.random() < 0.5:
        minutes += rnd.choice([0, 1, 7, 14]) + rnd.random()
    return START + timedelta(minutes=minutes)


async def random_ledger(store: Store, rnd: random.Random) -> list[datetime]:
    """Returns the occurrences' due times (where most deliveries are)."""
    plan = calendar_plan()
    await register(store, plan)
    template = plan.template.id
    # fan-outs at several due times within one quarter hour (a sweep's time zones, a deferral)
    quarters = [START + timedelta(minutes=15 * rnd.randrange(20 * 24 * 4)) for _ in range(15)]
    fires = [q + timedelta(minutes=m) for q in quarters for m in rnd.sample(range(15), 2)]
    rows = []
    for k in range(600):
        due = rnd.choice(fires) if rnd.random() < 0.8 else moment(rnd)
        status = rnd.choice(STATUSES)
        reason = "push_failed" if status == "failed" and rnd.random() < 0.5 else None
        rows.append(
            (f"occ-{k % 40}", f"u{k % 60}", k % 3 + 1, due, status, reason,
             rnd.choice([None, "A", "B"]), rnd.choice([None, None, 0, 0, 43101]))
        )  # fmt: skip
    await store.pool.executemany(
        "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at, status,"
        " reason, variant, push_errcode, key_at)"
        " VALUES ('alerts', 1, $1, $2, $3, $4, $5, $6, $7, $8, $4) ON CONFLICT DO NOTHING",
        rows,
    )
    ids = [r["id"] for r in await store.pool.fetch("SELECT id FROM deliveries ORDER BY id")]
    # results, pushes and deferrals claimed again, in statements of many rows
    for _ in range(6):
        some = rnd.sample(ids, 40)
        await store.pool.execute(
            "UPDATE deliveries SET status = $2, reason = $3, push_errcode = $4"
            " WHERE id = ANY ($1::bigint[])",
            some,
            rnd.choice(["sent", "failed", "pending"]),
            rnd.choice([None, "push_failed"]),
            rnd.choice([None, 0, 43101]),
        )
    await store.pool.execute(
        "DELETE FROM deliveries WHERE id = ANY ($1::bigint[])", rnd.sample(ids, 20)
    )
    ids = [r["id"] for r in await store.pool.fetch("SELECT id FROM deliveries ORDER BY id")]
    opens = [
        OpenReport(f"u{rnd.randrange(60)}", 1001, moment(rnd), rnd.choice([*ids, None]), "test")
        for _ in range(250)
    ]
    for k in range(0, len(opens), 50):
        await store.consent.record_opens(opens[k : k + 50] + opens[k : k + 5])  # some again
    await store.pool.executemany(
        "INSERT INTO consent_events (user_id, template_id, kind, result, via, source,"
        " occurred_at) VALUES ($1, $2, 'long_term', $3, 'popup', 'backend', $4)",
        [(f"u{rnd.randrange(60)}", template, rnd.choice(["reject", "ban"]), moment(rnd))
         for _ in range(60)],
    )  # fmt: skip
    return fires


def edge(rnd: random.Random, fires: list[datetime]) -> datetime:
    """Often within the quarter hour of a fan-out, where the counts alone would be wrong."""
    if rnd.random() < 0.5:
        return rnd.choice(fires) + timedelta(minutes=rnd.choice([0, 1, 7, 14]))
    return moment(rnd) if rnd.random() < 0.8 else rnd.choice([START, START + timedelta(days=9)])


@pytest.mark.parametrize("seed", range(4))
async def test_engagement_figures_from_the_counts_are_the_ledgers(store: Store, seed: int):
    rnd = random.Random(seed)
    fires = await random_ledger(store, rnd)
    for folded in (False, True):
        if folded:
            assert await store.status.roll_up() > 0
        for _ in range(15):
            now, zone = edge(rnd, fires), rnd.choice(ZONES)
            start = None if rnd.random() < 0.3 else edge(rnd, fires)
            end = None if rnd.random() < 0.3 else edge(rnd, fires)
            got = await store.engagement.rows(
                "alerts", now=now, window=WINDOW, start=start, end=end, tz=zone
            )
            want = await store.pool.fetch(
                LEDGER_ENGAGEMENT_ROWS, "alerts", start, end, now, WINDOW, zone
            )
            assert got == [dict(r) for r in want], (now, start, end, zone)
            assert sum(r["sent"] for r in got) == sum(r["sent"] for r in want)


@pytest.mark.parametrize("seed", range(3))
async def test_guard_counts_from_the_counts_are_the_ledgers(store: Store, seed: int):
    rnd = random.Random(100 + seed)
    fires = await random_ledger(store, rnd)
    for folded in (False, True):
        if folded:
            await store.status.roll_up()
        for _ in range(15):
            since, recent, until = sorted(edge(rnd, fires) for _ in range(3))
            # spans that begin or end within a fan-out's quarter hour, or both
            spans = sorted(
                tuple(sorted((edge(rnd, fires), edge(rnd, fires)))) for _ in range(rnd.randrange(3))
            )
            got = await store.engagement.guard_counts(
                "alerts", since=since, recent_from=recent, until=until, window=WINDOW,
                leave_out=spans,
            )  # fmt: skip
            ranges = [asyncpg.Range(a, b, upper_inc=True) for a, b in spans]
            want = await store.pool.fetch(
                LEDGER_GUARD_COUNTS, "alerts", since, until, recent, WINDOW, ranges
            )
            assert got == [dict(r) for r in want], (since, recent, until, spans)
