"""Ingestion benchmark: consent API requests/s, and a 100,000-row CSV enrolment import.

    .venv/bin/python bench/consent_api.py [--requests 5000] [--concurrency 32] [--csv-rows 100000]

In a fresh database (`bench_<random>` on the server of --database-url / DATABASE_URL, else on an
embedded PostgreSQL in a temp dir) it registers a one-time relative plan, then:

1. serves the real API app (`create_app` under uvicorn, as the daemon does) in a child process on
   loopback and posts --requests POST /v1/consent requests (one popup result each, distinct users)
   with --concurrency in flight from this process (aiohttp); it checks that every one was stored;
2. writes a CSV of --csv-rows enrolments (openid, start, tz, variables) and times
   `reminders enroll PLAN --csv FILE` as a subprocess, end to end (process start, parse and
   checks of every row, COPY and upsert); it checks the row count.

The last line printed is

    consent_requests=N consent_req_per_s=R p50_ms=A p99_ms=B csv_rows=M csv_import_s=S

Everything started is stopped and the database dropped on the way out, also on error or after
--timeout seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import asyncpg

if __package__ in (None, ""):  # run as a script: make `bench` and `scheduler` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fanout import admin_execute, with_database
from scheduler.domain.plan import Plan
from scheduler.store.embedded import start_embedded
from scheduler.store.postgres import Store

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-ingest-token"
TEMPLATE = "bench_rehab_tmpl"
PLAN = Plan.model_validate(
    {
        "id": "bench-rehab",
        "name": "Weekly rehab guidance",
        "category": "medical",
        "consent": "one_time",
        "schedule": {"relative": {"every": "1 week", "count": 12, "at": "09:00"}},
        "template": {"id": TEMPLATE, "fields": {"thing1": "thing", "name2": "name"}},
        "message": {"default": {"thing1": "第{step}周康复指导", "name2": "{patient}"}},
        "variables": ["patient", "hospital"],
    }
)

SERVER = """
import asyncio, sys
from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.settings import Settings
from scheduler.store.postgres import Store

async def main(db_url, port, token):
    settings = Settings(api_tokens={"bench": {"token": token, "scopes": ["ingest"]}})
    async with Store.open(db_url, max_size=10) as store:
        server = ApiServer(create_app(settings, store), "127.0.0.1", port)
        await server.start()
        print("ready", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def user_id(i: int) -> str:
    return f"oBench{i:022d}"  # 28 characters, like a real openid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def consent_load(base_url: str, n: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    counter = iter(range(n))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            body = {
                "popups": [
                    {"openid": user_id(i), "kind": "one_time", "results": {TEMPLATE: "accept"}}
                ]
            }
            started = time.perf_counter()
            async with session.post(f"{base_url}/v1/consent", json=body, headers=headers) as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"FAILED: POST /v1/consent answered {r.status}")
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - started, latencies


def write_csv(path: Path, rows: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("openid,start,tz,patient,hospital\n")
        for i in range(rows):
            f.write(f"{user_id(i)},2026-03-02T10:00:00+08:00,Asia/Shanghai,患者{i},协和医院\n")


async def bench(args: argparse.Namespace, db_url: str, work: Path) -> str:
    async with Store.open(db_url) as store:
        await store.migrate()
        await store.register_plan(PLAN, "bench")

    port = free_port()
    server = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        db_url,
        str(port),
        TOKEN,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        line = await asyncio.wait_for(server.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise SystemExit("FAILED: the API server did not start")
        base_url = f"http://127.0.0.1:{port}"
        await consent_load(base_url, min(200, args.requests), args.concurrency)  # warm up
        seconds, latencies = await consent_load(base_url, args.requests, args.concurrency)
    finally:
        server.terminate()
        await server.wait()
    conn = await asyncpg.connect(db_url)
    try:
        stored = await conn.fetchval("SELECT count(*) FROM consent_events")
    finally:
        await conn.close()
    warm = min(200, args.requests)
    if stored != args.requests + warm:
        raise SystemExit(f"FAILED: {stored} consent events stored, {args.requests + warm} posted")
    rate = args.requests / seconds
    p50 = statistics.median(latencies) * 1000
    p99 = statistics.quantiles(latencies, n=100)[98] * 1000 if len(latencies) >= 100 else p50
    print(
        f"consent API: {args.requests} requests in {seconds:.2f} s = {rate:.0f} req/s "
        f"(concurrency {args.concurrency}; p50 {p50:.1f} ms, p99 {p99:.1f} ms)"
    )

    csv_path = work / "enrolments.csv"
    write_csv(csv_path, args.csv_rows)
    env = {**os.environ, "DATABASE_URL": db_url, "REMINDERS_PLANS_DIR": str(work)}
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scheduler.cli",
        "enroll",
        PLAN.id,
        "--csv",
        str(csv_path),
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    csv_seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"FAILED: the CSV import exited {proc.returncode}: {err.decode()[-2000:]}")
    conn = await asyncpg.connect(db_url)
    try:
        enrolled = await conn.fetchval("SELECT count(*) FROM enrollments")
    finally:
        await conn.close()
    if enrolled != args.csv_rows:
        raise SystemExit(f"FAILED: {enrolled} enrolments stored, {args.csv_rows} in the CSV")
    print(f"CSV import: {out.decode().strip()} ({csv_seconds:.1f} s with process start-up)")
    return (
        f"consent_requests={args.requests} consent_req_per_s={rate:.0f} p50_ms={p50:.1f} "
        f"p99_ms={p99:.1f} csv_rows={args.csv_rows} csv_import_s={csv_seconds:.1f}"
    )


async def main(args: argparse.Namespace) -> str:
    temp_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    embedded = False
    server_url = args.database_url or os.environ.get("DATABASE_URL")
    database = f"bench_{secrets.token_hex(6)}"
    created = False
    try:
        async with asyncio.timeout(args.timeout):
            if not server_url:
                server_url = await asyncio.to_thread(start_embedded, temp_dir / "pgdata")
                embedded = True
            await admin_execute(server_url, f"CREATE DATABASE {database}")
            created = True
            return await bench(args, with_database(server_url, database), temp_dir)
    except TimeoutError:
        raise SystemExit(
            f"ABORTED: the benchmark did not finish within --timeout {args.timeout:.0f} s"
        ) from None
    finally:
        if created and server_url:
            try:
                await admin_execute(server_url, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            except (OSError, asyncpg.PostgresError) as exc:
                print(f"warning: could not drop database {database}: {exc}", file=sys.stderr)
        if embedded:
            import pgserver  # the embedded server: stop it before removing its data

            await asyncio.to_thread(pgserver.get_server(temp_dir / "pgdata").cleanup)
        shutil.rmtree(temp_dir, ignore_errors=True)


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000, help="consent requests (timed)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--csv-rows", type=int, default=100_000)
    parser.add_argument(
        "--database-url",
        help="a PostgreSQL server (default: DATABASE_URL, else an embedded one in a temp dir)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many s")
    args = parser.parse_args()
    if not 1 <= args.requests <= 1_000_000 or not 1 <= args.csv_rows <= 2_000_000:
        parser.error("--requests and --csv-rows must be positive and bounded")
    print(json.dumps(vars(args)))
    print(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
