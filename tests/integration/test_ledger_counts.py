"""The ledger's counts (migration 010) against the ledger itself: after every kind of change the
send pipeline makes, the counts plus their deltas equal a GROUP BY over `deliveries`, before and
after a roll-up, and the status reads built on them equal the full-table queries they replaced,
whatever hour a window's edge falls in."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from scheduler.app.lifecycle import Lifecycle
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.store.lifecycle import skip_cancelled
from scheduler.store.postgres import CapUse, ClaimBatch, Due, Finished, Stop, Store
from scheduler.store.status import LAST_ERRORS
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import USERS, Clock, audience, calendar_plan, daily, dispatcher, enrol, register

FIRE = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)

LEDGER = (
    "SELECT plan_id, date_trunc('hour', due_at, 'UTC') AS due_hour, status,"
    " coalesce(reason, '') AS reason, count(*) AS n FROM deliveries GROUP BY 1, 2, 3, 4"
)
COUNTED = (
    "SELECT plan_id, due_hour, status, reason, sum(n)::bigint AS n FROM"
    " (SELECT * FROM delivery_counts UNION ALL SELECT * FROM delivery_counts_delta) AS c"
    " GROUP BY 1, 2, 3, 4 HAVING sum(n) <> 0"
)
# The status queries the counts replaced, over the whole ledger.
OUTCOMES_FROM_LEDGER = (
    "SELECT status, reason,"
    " count(*) FILTER (WHERE due_at > $2::timestamptz - interval '24 hours') AS d1,"
    " count(*) FILTER (WHERE due_at > $2::timestamptz - interval '7 days') AS d7,"
    " count(*) AS total"
    " FROM deliveries WHERE ($1::text IS NULL OR plan_id = $1) AND due_at <= $2"
    " GROUP BY status, reason ORDER BY status, reason NULLS FIRST"
)
PER_PLAN_FROM_LEDGER = (
    "SELECT plan_id, status,"
    " count(*) FILTER (WHERE due_at > $1::timestamptz - interval '24 hours') AS d1,"
    " count(*) FILTER (WHERE due_at > $1::timestamptz - interval '7 days') AS d7,"
    " count(*) AS total FROM deliveries WHERE due_at <= $1 GROUP BY plan_id, status"
)


async def assert_counts_match(store: Store) -> None:
    ledger = {tuple(r.values())[:4]: r["n"] for r in await store.pool.fetch(LEDGER)}
    counted = {tuple(r.values())[:4]: r["n"] for r in await store.pool.fetch(COUNTED)}
    assert counted == ledger


async def assert_rolled_up_match(store: Store) -> None:
    await assert_counts_match(store)
    assert await store.status.roll_up() >= 0
    assert await store.pool.fetchval("SELECT count(*) FROM delivery_counts_delta") == 0
    assert await store.pool.fetchval("SELECT count(*) FROM delivery_counts WHERE n = 0") == 0
    await assert_counts_match(store)


async def test_counts_follow_every_change_the_send_pipeline_makes(store, fake, channel):
    # Fan-outs on the fake: sends, no_consent once the credits run out, an opt-out, a 40003.
    plan = daily(consent="one_time")
    await register(store, plan)
    await audience(store, plan, ["o-a", "o-b", "o-c", "o-d"], credits=2)
    await Lifecycle(store).opt_out("o-d", plan_id=plan.id, actor="t", reason="asked")
    clock = Clock(FIRE)
    d = dispatcher(store, channel, clock)
    for day in range(3):
        clock.now = FIRE + timedelta(days=day)
        if day == 2:
            fake.inject(errcodes=[40003])
        await d.fire(plan.id, clock.now)
    await assert_counts_match(store)

    # Gate claims with refusals: a content stop, a quiet-hours deferral, a full cap deferred
    # to its reset; then the deferred rows claimed again (INSERT ... ON CONFLICT DO UPDATE).
    alerts = calendar_plan()
    await register(store, alerts)
    await enrol(store, alerts, USERS)
    gate = ClaimBatch("alerts", 1, "tmpl_alert", "long_term", "r1", "defer", timedelta(hours=16))
    reset = FIRE + timedelta(hours=15)
    cap = (CapUse("user-day:shared", 1, reset),)
    stops = [
        Stop(Outcome.SKIPPED, Reason.CONTENT, "promotional"),
        Stop(Outcome.DEFERRED, Reason.QUIET_HOURS, "quiet", FIRE + timedelta(hours=8)),
    ]
    dues = [
        Due(
            "occ-1",
            u,
            1,
            FIRE + timedelta(minutes=7 * i),
            {"thing1": "x"},
            stops[i] if i < 2 else None,
            cap if i in (2, 3) else (),
        )
        for i, u in enumerate(USERS)
    ]
    claims = await store.claim(store.pool, gate, dues)
    assert sorted(str(c.status) for c in claims) == [
        "deferred",
        "deferred",
        "deferred",  # the full cap: neither of its two rows fits
        "pending",
        "pending",
        "skipped",
    ]
    await assert_counts_match(store)
    deferred = {c.user_id for c in claims if c.status == Outcome.DEFERRED}
    again = [
        Due(x.occurrence, x.user_id, 1, x.due_at, x.data) for x in dues if x.user_id in deferred
    ]
    assert [c.status for c in await store.claim(store.pool, gate, again)] == ["pending"] * 3
    await assert_counts_match(store)

    # Results: a send, a failure, one put back deferred; a no-count update (a push receipt).
    pending = [
        r["id"]
        for r in await store.pool.fetch(
            "SELECT id FROM deliveries WHERE plan_id = 'alerts' AND status = 'pending' ORDER BY id"
        )
    ]
    await store.finish(
        "tmpl_alert",
        "long_term",
        [
            Finished(pending[0], Outcome.SENT, None, 0, 1001, None),
            Finished(pending[1], Outcome.FAILED, Reason.TRANSIENT, -1, None, "busy"),
            Finished(pending[2], Outcome.DEFERRED, None, None, None, None, reset),
        ],
    )
    await store.pool.execute("UPDATE deliveries SET push_status = 'success' WHERE msgid = 1001")
    await assert_rolled_up_match(store)

    # A replica dies with two sends on the wire and one claimed: unknown, and one released.
    occ2 = [Due("occ-2", u, 2, FIRE + timedelta(days=1), {"thing1": "x"}) for u in USERS[:3]]
    gone = ClaimBatch("alerts", 1, "tmpl_alert", "long_term", "gone")
    ids = [c.delivery_id for c in await store.claim(store.pool, gone, occ2)]
    await store.fanout.record_flight("gone", [], ids[:2], [])
    recovered = await store.fanout.recover("gone")
    assert (recovered.unknown, recovered.released) == (2, 1)
    await assert_counts_match(store)

    # Too late to send (missed), then the plan cancelled: what was pending or deferred is
    # skipped; then a row deleted by hand.
    late = [("occ-3", u, 3, FIRE + timedelta(days=2, minutes=13 * i)) for i, u in enumerate(USERS)]
    await store.skip(
        plan_id="alerts",
        version=1,
        replica="r1",
        rows=late,
        status="missed",
        reason="grace_exceeded",
    )
    await store.skip(  # already recorded: ON CONFLICT DO NOTHING changes nothing
        plan_id="alerts", version=1, replica="r1", rows=late, status="skipped", reason="paused"
    )
    await Lifecycle(store, clock=clock).cancel("alerts", actor="t", reason="over")
    assert (
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE reason = 'cancelled'") == 2
    )
    await store.pool.execute(
        "DELETE FROM deliveries WHERE occurrence = 'occ-3' AND step = 3 AND user_id = $1", USERS[0]
    )
    await assert_rolled_up_match(store)

    # The status reads agree with the full-table queries at every moment of the story.
    for minutes in range(-60, 4 * 24 * 60, 37):
        now = FIRE + timedelta(minutes=minutes, seconds=11)
        for plan_id in (None, "alerts", "daily"):
            expected = [dict(r) for r in await store.pool.fetch(OUTCOMES_FROM_LEDGER, plan_id, now)]
            assert await store.status.outcome_counts(plan_id, now) == expected, (plan_id, now)


async def test_status_windows_are_exact_at_any_edge_within_an_hour(store: Store):
    # Rows due every 7 minutes for 9 days, some in the future of each `now` below.
    base = datetime(2026, 3, 10, 10, 0, tzinfo=UTC)
    rows = [
        ("occ", f"u{k}", 1, base + timedelta(minutes=7 * k, microseconds=k % 3))
        for k in range(-1900, 60)
    ]
    await store.skip(
        plan_id="p", version=1, replica="r", rows=rows, status="missed", reason="grace_exceeded"
    )
    await store.skip(
        plan_id="q", version=1, replica="r", rows=rows[::5], status="skipped", reason="paused"
    )
    await store.status.roll_up()
    edges = [timedelta(0), timedelta(microseconds=1), timedelta(minutes=3), timedelta(minutes=59)]
    for hour in (-1, 0, 1, 5):
        for edge in edges:
            now = base + timedelta(hours=hour) + edge
            for plan_id in (None, "p", "q"):
                expected = [
                    dict(r) for r in await store.pool.fetch(OUTCOMES_FROM_LEDGER, plan_id, now)
                ]
                assert await store.status.outcome_counts(plan_id, now) == expected
            per_plan = [dict(r) for r in await store.pool.fetch(PER_PLAN_FROM_LEDGER, now)]
            got = await store.status.outcome_counts_per_plan(now)
            assert sorted(got, key=lambda r: (r["plan_id"], r["status"])) == sorted(
                per_plan, key=lambda r: (r["plan_id"], r["status"])
            )


async def test_the_migration_counts_a_ledger_that_already_has_rows(store: Store):
    rows = [("occ", f"u{k}", 1, FIRE + timedelta(minutes=41 * k)) for k in range(200)]
    await store.skip(
        plan_id="p", version=1, replica="r", rows=rows, status="missed", reason="grace_exceeded"
    )
    await store.pool.execute(
        "DROP TABLE delivery_counts, delivery_counts_delta CASCADE;"
        " DROP INDEX deliveries_errors;"
        " DROP FUNCTION delivery_outcomes_v1, roll_up_delivery_counts_v1,"
        "  delivery_counts_inserted_v1, delivery_counts_updated_v1, delivery_counts_deleted_v1,"
        "  delivery_counts_truncated_v1 CASCADE;"
        " DELETE FROM schema_migrations WHERE name = '010_ledger_counts.sql'"
    )
    assert await store.migrate() == ["010_ledger_counts.sql"]
    await assert_counts_match(store)
    assert await store.pool.fetchval("SELECT sum(n) FROM delivery_counts") == 200

    await store.pool.execute("TRUNCATE deliveries CASCADE")
    await assert_counts_match(store)
    assert await store.pool.fetchval("SELECT count(*) FROM delivery_counts") == 0


async def test_last_errors_come_from_their_own_index(store: Store):
    rows = [("occ", f"u{k}", 1, FIRE) for k in range(2000)]
    await store.skip(
        plan_id="p", version=1, replica="r", rows=rows, status="missed", reason="grace_exceeded"
    )
    await store.pool.execute("ANALYZE deliveries")
    plan = "\n".join(r[0] for r in await store.pool.fetch("EXPLAIN " + LAST_ERRORS, "p", 5))
    # The ledger is partitioned (migration 014): each month's copy of deliveries_errors is
    # named after its partition, deliveries_<month>_plan_id_id_idx.
    assert "_plan_id_id_idx" in plan, plan
    assert "Seq Scan on deliveries_default" not in plan, plan


async def test_a_cancel_finds_its_rows_through_the_partial_indexes(store: Store):
    """Migration 017 dropped (plan_id, status): a cancel's deferred and given-back rows are found
    through the partial indexes of those statuses, not by reading the plan's whole partition."""
    rows = [("occ", f"u{k}", 1, FIRE) for k in range(2000)]
    await store.skip(
        plan_id="p", version=1, replica="r", rows=rows, status="missed", reason="grace_exceeded"
    )
    await store.pool.execute(
        "UPDATE deliveries SET status = 'deferred', defer_until = due_at, finished_at = NULL"
        " WHERE user_id IN ('u1', 'u2')"
    )
    await store.pool.execute("ANALYZE deliveries")
    partition = await store.pool.fetchval("SELECT tableoid::regclass::text FROM deliveries LIMIT 1")
    scans = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relname = $1"
    async with store.pool.acquire() as conn, conn.transaction():
        # This backend's counts not yet flushed: the difference is the cancel's own.
        before = await conn.fetchrow(scans, partition)
        assert await skip_cancelled(conn, "p") == (2, 0)
        after = await conn.fetchrow(scans, partition)
    assert after["seq_scan"] - before["seq_scan"] == 0, (dict(before), dict(after))
    assert after["idx_scan"] - before["idx_scan"] == 2, (dict(before), dict(after))


async def test_roll_ups_beside_each_other_and_writers_fold_each_delta_once(store: Store):
    async def write(k: int) -> None:
        rows = [("occ", f"u{k}-{i}", 1, FIRE + timedelta(hours=i % 5)) for i in range(20)]
        await store.skip(plan_id="p", version=1, replica="r", rows=rows, status="missed",
                         reason="grace_exceeded")  # fmt: skip

    for k in range(10):
        await write(k)
    folded = await asyncio.gather(
        *(store.status.roll_up() for _ in range(3)), *(write(k) for k in range(10, 20))
    )
    assert max(folded[:3]) >= 10 and min(folded[:3]) >= -1
    await assert_rolled_up_match(store)
    assert await store.pool.fetchval("SELECT sum(n) FROM delivery_counts") == 400


async def test_the_stores_sessions_run_without_jit(store: Store):
    """JIT compiling a status read whose estimate crosses jit_above_cost cost 0.28 s of a 0.33 s
    read at 10M ledger rows: every session of the store's pool has it off."""
    async with store.pool.acquire() as a, store.pool.acquire() as b:
        assert [await a.fetchval("SHOW jit"), await b.fetchval("SHOW jit")] == ["off", "off"]
