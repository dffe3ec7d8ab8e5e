"""Fan-out benchmark: one occurrence of a calendar plan sent to N users, end to end.

    .venv/bin/python bench/fanout.py --users 100000 [--concurrency 64] [--batch-size 500]

Registers a daily long-term `transport` plan in a fresh database (`bench_<random>` on the server
of --database-url / DATABASE_URL, else on an embedded PostgreSQL in a temp dir), bulk-loads N
enrolments and N long-term consents with COPY (not timed), starts the fake WeChat in a subprocess
(its own core where there are two; keep_messages off), and times `Dispatcher.fire` for one real
occurrence of the plan: audience pages, ledger claims with consent, HTTP sends and result writes.
It then checks that N rows are `sent` in the ledger and that the fake counted N sends.

Against the same fake, same concurrency, no database, it measures the channel's own HTTP client
(`channel_loop`) and a bare aiohttp loop (`aiohttp_loop`) posting the same messages (the first
min(N, --baseline-max) of them). The last line printed is

    users=N sends_per_s=S channel_per_s=C raw_per_s=B ratio=R raw_ratio=Q peak_rss_mb=M

with ratio = S / C and raw_ratio = S / B. Loopback only; everything started is stopped and the
database dropped on the way out, also on error or after --timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import aiohttp
import asyncpg

if __package__ in (None, ""):  # run as a script: make `bench` and `scheduler` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.http_baselines import _fetch_token, _pin, _start_fake, aiohttp_loop, channel_loop
from scheduler.app.dispatcher import Dispatcher
from scheduler.channels.base import OutgoingMessage
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.messages import render
from scheduler.domain.plan import Plan
from scheduler.domain.schedule import calendar_anchor, calendar_occurrences
from scheduler.planfiles import content_hash
from scheduler.store.embedded import start_embedded
from scheduler.store.postgres import Store

TZ = "Asia/Shanghai"
PLAN = Plan.model_validate(
    {
        "id": "bench-fanout",
        "name": "Line 2 morning congestion alert",
        "category": "transport",
        "consent": "long_term",
        "schedule": {"calendar": {"timezone": TZ, "daily": {"at": "07:30"}, "start": "2026-03-02"}},
        "template": {
            "id": "bench_commute_tmpl",
            "page": "pages/transit/line?line=2",
            "fields": {"thing1": "thing", "time2": "time", "phrase3": "phrase"},
        },
        "message": {
            "default": {
                "thing1": "{line}号线早高峰出行提醒",
                "time2": "{time}",
                "phrase3": "请错峰",
            }
        },
        "variables": ["line"],
    }
)
START = datetime(2026, 3, 1, 16, 0, tzinfo=UTC)  # enrolment start: 2026-03-02 00:00 Shanghai


def user_id(i: int) -> str:
    return f"oBench{i:022d}"  # 28 characters, like a real openid


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def admin_execute(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def load(store: Store, db_url: str, n: int) -> None:
    """Register the plan and COPY n enrolments and n long-term consents (streamed, not listed)."""
    await store.register_plan(
        PLAN.id, "calendar", content_hash(PLAN), PLAN.model_dump(mode="json"), "bench"
    )
    enrolments: Iterator[tuple[Any, ...]] = (
        (PLAN.id, user_id(i), START, TZ, json.dumps({"line": str(2 + i % 3)})) for i in range(n)
    )
    consents: Iterator[tuple[Any, ...]] = (
        (user_id(i), PLAN.template.id, 0, True, False) for i in range(n)
    )
    # A plain connection: COPY is binary, and the store's JSON codec for jsonb is text-only.
    conn = await asyncpg.connect(db_url)
    try:
        await conn.copy_records_to_table(
            "enrollments",
            records=enrolments,
            columns=["plan_id", "user_id", "start_at", "tz", "vars"],
        )
        await conn.copy_records_to_table(
            "consent",
            records=consents,
            columns=["user_id", "template_id", "credits", "long_term", "banned"],
        )
        await conn.execute("VACUUM ANALYZE enrollments")
        await conn.execute("VACUUM ANALYZE consent")
    finally:
        await conn.close()


def messages(fire_time: datetime, step: int, n: int) -> list[OutgoingMessage]:
    """The first n messages exactly as the dispatcher renders them for this occurrence."""
    tz = ZoneInfo(TZ)
    return [
        OutgoingMessage(
            user_id(i),
            PLAN.template.id,
            render(PLAN, step, fire_time, tz, user_id(i), {"line": str(2 + i % 3)}),
            PLAN.template.page,
        )
        for i in range(n)
    ]


async def fake_sends(base_url: str) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/fake/stats") as response,
    ):
        return int((await response.json())["sends"])


def cpu_us(since: float, count: int) -> float:
    """Microseconds of this process's CPU per item since `since` (robust to a busy machine)."""
    return (time.process_time() - since) / count * 1e6


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def bench(args: argparse.Namespace, server_url: str, db_url: str, base_url: str) -> str:
    n, concurrency = args.users, args.concurrency
    async with Store.open(db_url, max_size=args.pool_size) as store:
        started = time.perf_counter()
        await store.migrate()
        await load(store, db_url, n)
        print(f"setup: {n} enrolments + consents loaded in {time.perf_counter() - started:.1f} s")

        cal = PLAN.schedule.calendar
        assert cal is not None
        record = await store.plan(PLAN.id)
        assert record is not None
        first = next(calendar_occurrences(cal, calendar_anchor(cal, record.registered_at)))
        fire_time, step = first.due_at, first.step
        baseline = messages(fire_time, step, min(n, args.baseline_max))

        channel = WeChatChannel(base_url, "bench", "bench")
        try:
            await channel_loop(channel, baseline[:500], concurrency)  # token and pool warm-up
            cpu = time.process_time()
            channel_per_s = await channel_loop(channel, baseline, concurrency)
            channel_us = cpu_us(cpu, len(baseline))
            token = await _fetch_token(base_url)
            cpu = time.process_time()
            raw_per_s = await aiohttp_loop(base_url, token, baseline, concurrency)
            raw_us = cpu_us(cpu, len(baseline))
            print(
                f"baselines over {len(baseline)} messages (min(N, {args.baseline_max})), "
                f"concurrency {concurrency}: channel {channel_per_s:.0f}/s "
                f"({channel_us:.0f} us CPU/send), bare aiohttp {raw_per_s:.0f}/s "
                f"({raw_us:.0f} us CPU/send)"
            )

            # The baselines' messages are the benchmark's own garbage: with 50,000 of them alive,
            # every full GC pass during the fan-out would walk them too.
            del baseline
            gc.collect()

            dispatcher = Dispatcher(
                store,
                channel,
                replica_id="bench",
                concurrency=concurrency,
                batch_size=args.batch_size,
                clock=lambda: fire_time,
            )
            sends_before = await fake_sends(base_url)
            started, cpu = time.perf_counter(), time.process_time()
            report = await dispatcher.fire(PLAN.id, fire_time)
            elapsed = time.perf_counter() - started
            fire_us = cpu_us(cpu, max(report.sent, 1))
        finally:
            await channel.aclose()
        sends_per_s = report.sent / elapsed
        print(
            f"fire {fire_time.isoformat()} (step {step}): {report.outcomes} in {elapsed:.2f} s "
            f"= {sends_per_s:.0f} sends/s ({fire_us:.0f} us CPU/send in this process; "
            f"batch {args.batch_size}, concurrency {concurrency})"
        )

        ledger = await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'sent'")
        faked = await fake_sends(base_url) - sends_before
        print(f"checks: report.sent={report.sent} ledger sent={ledger} fake sends={faked} (N={n})")
        if not report.sent == ledger == faked == n:
            raise SystemExit("FAILED: every user must be sent exactly one message")

    rss = peak_rss_mb()
    print(f"peak RSS of this process: {rss:.0f} MB")
    return (
        f"users={n} sends_per_s={sends_per_s:.0f} channel_per_s={channel_per_s:.0f} "
        f"raw_per_s={raw_per_s:.0f} ratio={sends_per_s / channel_per_s:.2f} "
        f"raw_ratio={sends_per_s / raw_per_s:.2f} peak_rss_mb={rss:.0f}"
    )


async def main(args: argparse.Namespace) -> str:
    temp_dir: Path | None = None
    server_url = args.database_url or os.environ.get("DATABASE_URL")
    database = f"bench_{secrets.token_hex(6)}"
    created = False
    fake: asyncio.subprocess.Process | None = None
    try:
        async with asyncio.timeout(args.timeout):
            if not server_url:
                temp_dir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
                server_url = await asyncio.to_thread(start_embedded, temp_dir / "pgdata")
            await admin_execute(server_url, f"CREATE DATABASE {database}")
            created = True
            fake, base_url = await _start_fake()
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            if len(cpus) >= 2:
                # This process on a core of its own, as the daemon would be beside a database
                # server and WeChat elsewhere: the fake and an embedded PostgreSQL (its server
                # processes are forked from the postmaster, so they follow it) share the other.
                _pin(fake.pid, cpus[1])
                if temp_dir is not None:
                    import pgserver

                    _pin(pgserver.get_server(temp_dir / "pgdata").get_pid(), cpus[1])
                _pin(0, cpus[0])
            print(f"database {database}, fake WeChat at {base_url} (pid {fake.pid})")
            return await bench(args, server_url, with_database(server_url, database), base_url)
    except TimeoutError:
        raise SystemExit(
            f"ABORTED: the benchmark did not finish within --timeout {args.timeout:.0f} s"
        ) from None
    finally:
        if fake is not None and fake.returncode is None:
            fake.terminate()
            try:
                await asyncio.wait_for(fake.wait(), 10)
            except TimeoutError:
                fake.kill()
                await fake.wait()
        if created and server_url:
            try:
                await admin_execute(server_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            except (OSError, asyncpg.PostgresError) as exc:  # do not hide the original error
                print(f"warning: could not drop database {database}: {exc}", file=sys.stderr)
        if temp_dir is not None:
            import pgserver  # the embedded server: stop it before removing its data

            await asyncio.to_thread(pgserver.get_server(temp_dir / "pgdata").cleanup)
            shutil.rmtree(temp_dir, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000, help="audience size (up to 1e6)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool max_size")
    parser.add_argument(
        "--baseline-max",
        type=int,
        default=50_000,
        help="messages posted by each HTTP baseline: min(N, this)",
    )
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server (default: DATABASE_URL, else an embedded one in a temp dir)",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="abort after this many s")
    args = parser.parse_args()
    if not 1 <= args.users <= 1_000_000:
        parser.error("--users must be between 1 and 1,000,000")
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # platformdirs, via pgserver
    print(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
