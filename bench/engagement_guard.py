"""What the engagement guard costs per plan and sweep (docs/engagement.md, "The guard").

    .venv/bin/python bench/engagement_guard.py [--users 10200] [--days 28] [--rounds 5]

In a scratch database (on the server of --database-url / DATABASE_URL, else an embedded
PostgreSQL in a temp dir) one daily plan gets --users deliveries a day for --days days and one
user in 50 a day cancels four hours after the message; then it times, best of --rounds, the
queries one sweep runs for that plan (`guarded_plans`, `judged_spans`, `guard_counts`) next to
the 7-day engagement read of /metrics (`EngagementStore.rows`). The last line printed is

    deliveries=N cancellations=C guard_s=G plans_and_spans_s=P metrics_7d_s=M
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from scheduler.domain.plan import Plan
from scheduler.store.embedded import temporary_embedded
from scheduler.store.postgres import Store
from scheduler.store.scratch import scratch_database

PLAN = Plan.model_validate(
    {
        "id": "big",
        "name": "Big",
        "category": "transport",
        "consent": "long_term",
        "schedule": {
            "calendar": {
                "timezone": "Asia/Shanghai",
                "daily": {"at": "09:00"},
                "start": "2026-03-01",
            }
        },
        "template": {"id": "tmpl_big", "fields": {"thing1": "thing"}},
        "message": {"default": {"thing1": "Tip {step}"}},
    }
)
WINDOW = timedelta(hours=72)


async def best(rounds: int, work: Callable[[], Awaitable[Any]]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await work()
        times.append(time.perf_counter() - start)
    return min(times)


async def bench(url: str, users: int, days: int, rounds: int) -> str:
    async with Store.open(url) as store:
        await store.migrate()
        await store.register_plan(PLAN, "bench")
        await store.pool.execute(
            "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
            " status, msgid, key_at)"
            " SELECT 'big', 1, 'occ-' || d, 'u' || u, d,"
            "  timestamptz '2026-03-01 01:00+00' + d * interval '1 day', 'sent', d * 1000000 + u,"
            "  timestamptz '2026-03-01 01:00+00' + d * interval '1 day'"
            " FROM generate_series(1, $1::int) d, generate_series(1, $2::int) u",
            days,
            users,
        )
        await store.pool.execute(
            "INSERT INTO consent_events (user_id, template_id, kind, result, source, via,"
            " occurred_at)"
            " SELECT 'u' || u, 'tmpl_big', 'long_term', 'reject', 'wechat:callback', 'settings',"
            "  timestamptz '2026-03-01 05:00+00' + d * interval '1 day'"
            " FROM generate_series(1, $1::int) d, generate_series(1, $2::int) u"
            " WHERE (u * 7 + d * 13) % 50 = 0",
            days,
            users,
        )
        await store.pool.execute("ANALYZE")
        deliveries = await store.pool.fetchval("SELECT count(*) FROM deliveries")
        cancellations = await store.pool.fetchval("SELECT count(*) FROM consent_events")
        now = datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=days)
        reads = store.engagement

        async def guard() -> None:
            await reads.guard_counts(
                PLAN.id,
                since=now - timedelta(days=8),
                recent_from=now - timedelta(days=1),
                until=now,
                window=WINDOW,
                leave_out=[(now - timedelta(days=3), now - timedelta(days=2))],
            )

        async def plans_and_spans() -> None:
            await reads.guarded_plans(now - timedelta(days=1), now)
            await reads.judged_spans(PLAN.id, actor="engagement", since=now - timedelta(days=8))

        async def metrics_7d() -> None:
            await reads.rows(
                PLAN.id, now=now, window=WINDOW, start=now - timedelta(days=7), end=now
            )

        g = await best(rounds, guard)
        p = await best(rounds, plans_and_spans)
        m = await best(rounds, metrics_7d)
    return (
        f"deliveries={deliveries} cancellations={cancellations} guard_s={g:.3f} "
        f"plans_and_spans_s={p:.3f} metrics_7d_s={m:.3f}"
    )


async def on_server(server: str, args: argparse.Namespace) -> str:
    async with scratch_database(server) as url:
        return await bench(url, args.users, args.days, args.rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_200)
    parser.add_argument("--days", type=int, default=28)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    if args.database_url:
        print(asyncio.run(on_server(args.database_url, args)))
        return
    with temporary_embedded() as server:
        print(asyncio.run(on_server(server, args)))


if __name__ == "__main__":
    main()
