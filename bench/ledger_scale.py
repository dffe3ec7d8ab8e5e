"""Ledger scale benchmark: status and the admin API over a ledger of N rows.

    .venv/bin/python bench/ledger_scale.py --rows 1000000 [--plans 12] [--days 90] [--repeat 3]
        [--database-url URL] [--before]

Creates a fresh database (`bench_<random>` on the server of --database-url / DATABASE_URL, else
on an embedded PostgreSQL in a temp dir), registers --plans daily calendar plans (one of them
relative), and COPYs N synthetic ledger rows into `deliveries` itself, so the ledger's count
triggers (migration 010) run as they would in production: one COPY statement per 250,000 rows.
The rows are spread over --days days up to now: each plan fires once a day at its own hour
(a skewed share per plan: the biggest holds about a quarter of the rows), every row of a
calendar occurrence due at its fire time, the relative plan's rows at 09:00 in four time zones;
outcomes about as production sees them (85 % sent, skips for consent, caps, quiet hours and
opt-outs, 2 % failed with errcodes, unknown, missed, and deferrals in the last day). Loading is
not timed (it prints its rate); then VACUUM ANALYZE and one roll-up.

It then times, each --repeat times (the median is reported):
  status_s       `reminders status --json` as a subprocess (DATABASE_URL set; Python start-up
                 included, most of it). The package's bytecode is compiled first, as
                 `pip install .` (the Dockerfile) leaves it: with PYTHONDONTWRITEBYTECODE set and an
                 editable install, every start would compile the sources again (+0.2 s here)
  status_plan_s  `reminders status PLAN --json` for the plan with the most rows
  api_plans_s    GET /v1/plans on the real app served on loopback (uvicorn, admin token)
and prints the in-process time of the status reads too (overview and plan_status), and of one
GET /metrics (its engagement gauges read every plan's last 7 days). The last line
is

    rows=N status_s=S status_plan_s=P api_plans_s=A fanout_per_s=F prune_s=R table_mb=M

where table_mb is the ledger's heap, indexes and TOAST (pg_total_relation_size of all its
partitions), and prune_s times `reminders ledger prune --retention-months 2` as a subprocess:
the month the rows start in is then wholly past retention and is dropped (the rows are loaded
into their month partitions, as a ledger that grew over those months has them).
fanout_per_s is a --fanout-users (10,000) occurrence of bench/fanout.py's plan fanned out on
this full ledger, end to end (`Dispatcher.fire`: chunks, claims with consent and caps, HTTP
sends to the fake WeChat in a subprocess, result writes), at today's fire time so its rows land
in the current month's partition beside the loaded ones; every user must be sent once. Nothing
is pinned here: compare it with bench/fanout.py --users 10000 on the same machine, not pinned.
Around it the ledger's size is read: the bytes it grew by per sent row (a claim, then its result:
two versions of the row, the first one dead), then, after a VACUUM, the same for the day
before's occurrence, which fills the space VACUUM freed (docs/operations.md, "Sizing").

--before drops what migration 010 added (the count triggers and tables, the last-errors index)
before loading: run it with the previous scheduler/store/status.py checked out to measure the
readers that scanned the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import logging
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx

if __package__ in (None, ""):  # run as a script: make `bench` and `scheduler` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fanout
from bench.http_baselines import _start_fake
from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.app import status
from scheduler.app.dispatcher import Dispatcher, occurrence_key
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.plan import Plan
from scheduler.settings import Settings
from scheduler.store.embedded import start_embedded
from scheduler.store.postgres import Store

PACKAGE = str(Path(__file__).resolve().parent.parent / "scheduler")
COPY_ROWS = 250_000  # rows per COPY statement (one firing of the statement trigger each)
ADMIN_TOKEN = "bench-admin-token"
COLUMNS = [
    "plan_id", "plan_version", "occurrence", "user_id", "step", "due_at", "status", "reason",
    "errcode", "msgid", "detail", "message", "claimed_by", "claimed_at", "finished_at",
    "key_at",
]  # fmt: skip
# (status, reason, errcode, weight): roughly a production mix
OUTCOMES = [
    ("sent", None, None, 850),
    ("skipped", "no_consent", None, 50),
    ("skipped", "capped", None, 30),
    ("skipped", "quiet_hours", None, 10),
    ("skipped", "opted_out", None, 10),
    ("failed", "bad_openid", 40003, 8),
    ("failed", "transient", -1, 6),
    ("failed", "consent_gone", 43101, 6),
    ("unknown", "reply_timeout", None, 3),
    ("unknown", "crashed_in_flight", None, 2),
    ("missed", "grace_exceeded", None, 10),
]
RELATIVE_ZONES = [8, 9, -5, 0]  # hours east of UTC of the relative plan's users


def plan_doc(i: int) -> dict[str, Any]:
    relative = i == 1
    schedule: dict[str, Any] = (
        {"relative": {"every": "1 day", "count": 365, "at": "09:00"}}
        if relative
        else {
            "calendar": {
                "timezone": "Asia/Shanghai",
                "daily": {"at": f"{(6 + i) % 24:02d}:00"},
                "start": "2026-01-01",
            }
        }
    )
    return {
        "id": f"bench-{i:02d}",
        "name": f"Bench plan {i}",
        "category": "transport",
        "consent": "long_term",
        "schedule": schedule,
        "template": {"id": f"tmpl_{i}", "fields": {"thing1": "thing", "time2": "time"}},
        "message": {"default": {"thing1": "第{step}天出行提醒", "time2": "{time}"}},
    }


def per_plan(n: int, n_plans: int) -> list[int]:
    """Rows of each plan: its share of n, the rounding left over to the biggest."""
    weights = [1 / (k + 1) ** 0.9 for k in range(n_plans)]  # about a quarter for the first
    counts = [int(n * w / sum(weights)) for w in weights]
    counts[0] += n - sum(counts)
    return counts


def synthetic_rows(n: int, plans: list[str], days: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    """n ledger rows: each plan its share, one occurrence a day for `days` days up to now."""
    rnd = random.Random(1)
    outcomes = [o[:3] for o in OUTCOMES]
    weights = [o[3] for o in OUTCOMES]
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    msgid = 10**15
    for index, (plan_id, count) in enumerate(zip(plans, per_plan(n, len(plans)), strict=True)):
        relative = index == 1
        users = -(-count // days)  # per occurrence
        fire_hour = timedelta(hours=(6 + index) % 24 - 8)  # its hour in Shanghai, in UTC
        left = count
        # Its last `days` fire times by now (today's, once its hour has come), the oldest first.
        latest = (
            midnight + fire_hour
            if midnight + fire_hour <= now
            else midnight + fire_hour - timedelta(days=1)
        )
        for day in range(days, 0, -1):
            if left == 0:
                break
            fire = latest - timedelta(days=day - 1)
            occurrence = f"step:{days - day + 1}" if relative else occurrence_key(fire)
            picks = rnd.choices(outcomes, weights, k=min(users, left))
            for u, (st, reason, errcode) in enumerate(picks):
                due = fire
                if relative:  # 09:00 in the user's own zone
                    zone = RELATIVE_ZONES[u % len(RELATIVE_ZONES)]
                    due = fire - fire_hour + timedelta(hours=9 - zone)
                    if due > now:
                        due -= timedelta(days=1)
                if now - due < timedelta(hours=6) and u % 50 == 0:
                    st, reason, errcode = "deferred", "quiet_hours", None
                msgid += 1
                message = {"thing1": f"第{days - day + 1}天出行提醒", "time2": "07:30"}
                yield (
                    plan_id, 1, occurrence, f"oBench{u:022d}", days - day + 1, due, st, reason,
                    errcode, msgid if st == "sent" else None,
                    f"errcode {errcode}" if errcode else None,
                    json.dumps(message, ensure_ascii=False), "r0", due,
                    None if st == "deferred" else due + timedelta(seconds=u % 300),
                    due,  # key_at: the due time (migration 014's ledger_key_at)
                )  # fmt: skip
            left -= len(picks)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def admin_execute(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


DROP_010 = (
    "DROP TABLE delivery_counts, delivery_counts_delta CASCADE;"
    " DROP INDEX deliveries_errors;"
    " DROP FUNCTION delivery_outcomes_v1, roll_up_delivery_counts_v1,"
    "  delivery_counts_inserted_v1, delivery_counts_updated_v1, delivery_counts_deleted_v1,"
    "  delivery_counts_truncated_v1 CASCADE"
)


# The ledger's partitions together (pg_total_relation_size of the partitioned parent is 0).
LEDGER_BYTES = (
    "SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint"
    " FROM pg_partition_tree('deliveries')"
)


async def load(db_url: str, n: int, plans: list[str], days: int, now: datetime) -> float:
    """COPY n rows into the ledger in statements of COPY_ROWS; returns the seconds it took."""
    rows = synthetic_rows(n, plans, days, now)
    conn = await asyncpg.connect(db_url)
    started = time.perf_counter()
    loaded = 0
    try:
        while True:
            batch = [r for _, r in zip(range(COPY_ROWS), rows, strict=False)]
            if not batch:
                break
            await conn.copy_records_to_table("deliveries", records=batch, columns=COLUMNS)
            loaded += len(batch)
            rate = loaded / (time.perf_counter() - started)
            print(f"  loaded {loaded:,} rows ({rate:,.0f}/s)", flush=True)
        took = time.perf_counter() - started
        await conn.execute("VACUUM ANALYZE deliveries")
        if await conn.fetchval("SELECT to_regclass('delivery_counts') IS NOT NULL"):
            folded = await conn.fetchval("SELECT roll_up_delivery_counts_v1()")
            await conn.execute("VACUUM ANALYZE delivery_counts")
            print(f"  rolled up {folded} deltas", flush=True)
        return took
    finally:
        await conn.close()


def timed_subprocess(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    json.loads(done.stdout)  # it answered with a whole report
    return took


def timed_prune(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Seconds `reminders ledger prune` took (Python start-up included), and what it said."""
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ledger prune failed ({done.returncode}): {done.stderr[-2000:]}")
    return took, done.stdout.rstrip()


def last_fire(now: datetime) -> datetime:
    """bench/fanout.py's plan fires daily at 07:30 Shanghai: its latest fire time by now."""
    local = now.astimezone(ZoneInfo(fanout.TZ))
    fire = local.replace(hour=7, minute=30, second=0, microsecond=0)
    return (fire if fire <= local else fire - timedelta(days=1)).astimezone(UTC)


async def timed_fanout(store: Store, db_url: str, users: int) -> float:
    """One real occurrence fanned out to `users` users on this ledger: its sends per second.
    Then the ledger's growth per row written by the send path (a claim, then its result: two
    row versions), before and after a VACUUM: the sizing of docs/operations.md."""
    await fanout.load(store, db_url, users)
    fire_time = last_fire(datetime.now(UTC))
    fake, base_url = await _start_fake()
    channel = WeChatChannel(base_url, "bench", "bench")
    try:
        took, grew = await _fire(store, channel, fire_time, users)
        print(f"fan-out of {users:,} users on this ledger: {took:.2f} s ({users / took:,.0f}/s)")
        print(
            f"  the ledger grew by {grew / users:.0f} bytes a sent row (heap, indexes, TOAST; a"
            " row's first version stays until VACUUM)"
        )
        await store.pool.execute("VACUUM deliveries")
        _, grew = await _fire(store, channel, fire_time - timedelta(days=1), users)
        print(
            f"  after VACUUM, the day before's fan-out grew it by {grew / users:.0f} bytes a sent"
            " row (the space VACUUM freed, used again)"
        )
    finally:
        await channel.aclose()
        await fanout.stop_process(fake)
    return users / took


async def _fire(
    store: Store, channel: WeChatChannel, fire_time: datetime, users: int
) -> tuple[float, int]:
    """bench/fanout.py's plan fired at `fire_time`: seconds taken, bytes the ledger grew by."""
    before = await store.pool.fetchval(LEDGER_BYTES)
    dispatcher = Dispatcher(store, channel, replica_id="bench", clock=lambda: fire_time)
    started = time.perf_counter()
    report = await dispatcher.fire(fanout.PLAN.id, fire_time)
    took = time.perf_counter() - started
    sent = await store.pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE plan_id = $1 AND occurrence = $2"
        " AND status = 'sent'",
        fanout.PLAN.id,
        occurrence_key(fire_time),
    )
    if not report.sent == sent == users:
        raise SystemExit(f"FAILED: the fan-out sent {report.sent} (ledger {sent}) of {users}")
    return took, await store.pool.fetchval(LEDGER_BYTES) - before


async def bench(args: argparse.Namespace, db_url: str) -> str:
    now = datetime.now(UTC)
    plans = [f"bench-{i:02d}" for i in range(args.plans)]
    async with Store.open(db_url) as store:
        await store.migrate()
        if args.before:
            await store.pool.execute(DROP_010)
        for i in range(args.plans):
            await store.register_plan(Plan.model_validate(plan_doc(i)), "bench")
        # The months the rows fall in, as a ledger that grew over them has (migration 014).
        await store.ledger.ensure_partitions()
        await store.pool.execute(
            "SELECT ensure_ledger_partitions(3, $1)", now - timedelta(days=args.days + 1)
        )
    took = await load(db_url, args.rows, plans, args.days, now)
    print(f"loaded {args.rows:,} rows in {took:.1f} s ({args.rows / took:,.0f} rows/s)")

    env = {**os.environ, "DATABASE_URL": db_url, "REMINDERS_PLANS_DIR": str(Path.cwd() / "plans")}
    compileall.compile_dir(PACKAGE, quiet=1)
    reminders = [sys.executable, "-m", "scheduler.cli"]
    big = plans[0]
    status_s = [timed_subprocess([*reminders, "status", "--json"], env) for _ in range(args.repeat)]
    plan_s = [
        timed_subprocess([*reminders, "status", big, "--json"], env) for _ in range(args.repeat)
    ]

    async with Store.open(db_url) as store:
        in_overview, in_plan = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            await status.overview(store, now=datetime.now(UTC))
            in_overview.append(time.perf_counter() - started)
            started = time.perf_counter()
            await status.plan_status(store, big, now=datetime.now(UTC))
            in_plan.append(time.perf_counter() - started)
        settings = Settings(
            api_tokens={"bench": {"token": ADMIN_TOKEN, "scopes": ["admin", "metrics"]}}
        )
        server = ApiServer(create_app(settings, store), "127.0.0.1", 0)
        await server.start()
        try:
            api_s = []
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{server.port}", headers=headers, timeout=600
            ) as client:
                for _ in range(args.repeat + 1):  # the first warms the app up
                    started = time.perf_counter()
                    response = await client.get("/v1/plans")
                    api_s.append(time.perf_counter() - started)
                    response.raise_for_status()
                api_s = api_s[1:]
                started = time.perf_counter()
                (await client.get("/metrics")).raise_for_status()  # engagement gauges: 7 days
                metrics_s = time.perf_counter() - started
        finally:
            await server.stop()
        table = await store.pool.fetchval(LEDGER_BYTES)
        rows_before = await store.pool.fetchval("SELECT count(*) FROM deliveries")
        counts = await store.pool.fetchval(
            "SELECT coalesce(pg_total_relation_size(to_regclass('delivery_counts')), 0)"
        )
        count_rows = await store.pool.fetchval(
            "SELECT CASE WHEN to_regclass('delivery_counts') IS NULL THEN 0"
            " ELSE (SELECT reltuples::bigint FROM pg_class WHERE relname = 'delivery_counts') END"
        )
    print(
        f"in process: overview {statistics.median(in_overview):.3f} s,"
        f" plan_status {statistics.median(in_plan):.3f} s; GET /metrics {metrics_s:.3f} s;"
        f" delivery_counts {count_rows:,} rows, {counts / 2**20:.1f} MB"
    )
    # The prune of the oldest month: with a 2-month retention, the month the rows start in is
    # wholly past it (the rows span --days days up to now) and holds only finished rows.
    prune_s, said = timed_prune([*reminders, "ledger", "prune", "--retention-months", "2"], env)
    async with Store.open(db_url) as store:
        dropped = rows_before - await store.pool.fetchval("SELECT count(*) FROM deliveries")
    print(f"ledger prune (retention 2 months): {dropped:,} rows dropped in {prune_s:.2f} s")
    print(said)
    print(f"ledger size: {table / max(rows_before, 1):.0f} bytes a row (heap, indexes, TOAST)")
    async with Store.open(db_url) as store:
        fanout_per_s = await timed_fanout(store, db_url, args.fanout_users)
    return (
        f"rows={args.rows} status_s={statistics.median(status_s):.3f}"
        f" status_plan_s={statistics.median(plan_s):.3f}"
        f" api_plans_s={statistics.median(api_s):.3f} fanout_per_s={fanout_per_s:.0f}"
        f" prune_s={prune_s:.2f}"
        f" table_mb={table / 2**20:.0f}"
    )


async def main(args: argparse.Namespace) -> str:
    temp_dir: Path | None = None
    server_url = args.database_url or os.environ.get("DATABASE_URL")
    database = f"bench_{secrets.token_hex(6)}"
    created = False
    try:
        if not server_url:
            temp_dir = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
            server_url = await asyncio.to_thread(start_embedded, temp_dir / "pgdata")
        await admin_execute(server_url, f"CREATE DATABASE {database}")
        created = True
        print(f"database {database}{' (--before: without migration 010)' if args.before else ''}")
        return await asyncio.wait_for(
            bench(args, with_database(server_url, database)), args.timeout
        )
    except TimeoutError:
        raise SystemExit(f"ABORTED: not finished within --timeout {args.timeout:.0f} s") from None
    finally:
        if created and server_url:
            try:
                await admin_execute(server_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"warning: could not drop database {database}: {exc}", file=sys.stderr)
        if temp_dir is not None:
            import pgserver  # the embedded server: stop it before removing its data

            await asyncio.to_thread(pgserver.get_server(temp_dir / "pgdata").cleanup)
            shutil.rmtree(temp_dir, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="ledger rows to load")
    parser.add_argument("--plans", type=int, default=12, help="plans the rows are spread over")
    parser.add_argument("--days", type=int, default=90, help="days the rows are spread over")
    parser.add_argument(
        "--fanout-users", type=int, default=10_000, help="audience of the timed fan-out"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timings of each (median)")
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server (default: DATABASE_URL, else an embedded one in a temp dir)",
    )
    parser.add_argument(
        "--before", action="store_true", help="without migration 010 (see the docstring)"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="abort after this many s")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
