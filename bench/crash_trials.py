"""Crash trials: kill the daemon at random moments of a fan-out, restart it, count every user.

    .venv/bin/python bench/crash_trials.py --trials 20 --users 20000 [--replicas 1] \
        [--signal KILL|TERM] [--kills 1] [--concurrency 256] [--lose-replies 0.0]

Each trial uses a fresh database (on --database-url / DATABASE_URL, else an embedded PostgreSQL),
a fake WeChat in its own process, a plan firing once a few seconds after the daemons start, and
U enrolled users with long-term consent. At random points of the fan-out (5-90 % of the users
recorded, in increasing order) the replica holding the most work gets the signal; it is started
again at once (same replica id), and so on `--kills` times; then the trial waits for the
occurrence to finish.

Per trial and in total it prints: duplicates (users the fake received more than one message for),
lost (enrolled users without a final ledger outcome), unknown (rows recorded `unknown`), pending
left, and the time to finish. The last line is machine-readable:

    trials=N users=U duplicates=D lost=L max_unknown=K

where max_unknown is the most `unknown` rows of any trial (the bound is kills x concurrency).
The acceptance tests run the same `run_trial` with small numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

if __package__ in (None, ""):  # run as a script: make `bench` and `scheduler` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scheduler.settings import SEND_CONCURRENCY  # noqa: E402 - after the path is set

PLAN_ID = "burst"
TEMPLATE_ID = "tmpl_burst"
PERMISSIVE_POLICY = """
caps:
  user_day: 1000000
  category_week: {medical: 1000000, education: 1000000}
  category_week_default: 1000000
quiet_hours:
  default: {start: "00:00", end: "00:00"}
  categories: {transport: {start: "00:00", end: "00:00"}}
"""


def plan_text(start: datetime) -> str:
    """A transport plan with one occurrence, at `start` (UTC, whole seconds)."""
    return f"""
id: {PLAN_ID}
name: Burst
category: transport
consent: long_term
schedule:
  calendar:
    timezone: UTC
    every: 1 hour
    start: "{start.strftime("%Y-%m-%dT%H:%M:%S")}"
    count: 1
  grace: 1 hour
template:
  id: {TEMPLATE_ID}
  fields:
    thing1: thing
message:
  default:
    thing1: "Run {{user}}"
"""


@dataclass
class TrialResult:
    users: int
    signals: int
    duplicates: int
    lost: int
    unknown: int
    pending: int
    seconds: float
    shares: dict[str, int] = field(default_factory=dict)  # replica -> sends it claimed
    exit_codes: list[int] = field(default_factory=list)  # of the replicas signalled
    down: int = 0  # replicas not running at the end

    def line(self) -> str:
        shares = " ".join(f"{k}={v}" for k, v in sorted(self.shares.items()))
        return (
            f"users={self.users} signals={self.signals} duplicates={self.duplicates} "
            f"lost={self.lost} unknown={self.unknown} pending={self.pending} "
            f"finish_s={self.seconds:.1f} exits={self.exit_codes} down={self.down} "
            f"shares: {shares}"
        )


class Replica:
    """One daemon process (`reminders run`) with its own replica id and log file."""

    def __init__(self, name: str, env: dict[str, str], log: Path):
        self.name, self.env, self.log = name, env, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.exit_codes: list[int] = []

    def start(self) -> None:
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "run"],
                env={**self.env, "REMINDERS_REPLICA_ID": self.name},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def signal(self, sig: int, wait_s: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(wait_s)
        self.exit_codes.append(code)
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Monitor:
    """The trial's own view of the database, reconnecting through an outage (a trial may
    restart PostgreSQL under it)."""

    def __init__(self, db_url: str):
        self.db_url = db_url
        self.conn: Monitor | None = None

    async def fetch(self, query: str, *args: object) -> list[asyncpg.Record]:
        from scheduler.store.postgres import retry_transient

        async def attempt() -> list[asyncpg.Record]:
            if self.conn is None or self.conn.is_closed():
                self.conn = await asyncpg.connect(self.db_url)
            return await self.conn.fetch(query, *args)

        return await retry_transient(120, what="the trial's query")(attempt)

    async def fetchrow(self, query: str, *args: object) -> asyncpg.Record:
        return (await self.fetch(query, *args))[0]

    async def fetchval(self, query: str, *args: object) -> object:
        return (await self.fetchrow(query, *args))[0]

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


class FakeProcess:
    """The fake WeChat in its own process, so a daemon's death does not touch it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.testing.fake_wechat", "--port", "0"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        assert self.url.startswith("http://127.0.0.1:"), self.url

    async def messages(self) -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as client:
            return (await client.get(f"{self.url}/fake/messages")).json()

    async def lose_replies(self, rate: float, latency_s: float) -> None:
        async with httpx.AsyncClient() as client:
            body = {"rate": rate, "reply": "delay", "latency_s": latency_s}
            (await client.post(f"{self.url}/fake/lose-replies", json=body)).raise_for_status()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def enrol(db_url: str, plans_dir: Path, users: int) -> None:
    """Register the plan as `reminders enroll` would and enrol `users` with long-term consent
    (in SQL: the setup is not what a trial measures)."""
    from scheduler.planfiles import load_plan_file
    from scheduler.store.postgres import Store

    item = load_plan_file(plans_dir / f"{PLAN_ID}.yaml")
    async with Store.open(db_url) as store:
        await store.migrate()
        await store.register_plan(item.plan, "trial")
        await store.pool.execute(
            "INSERT INTO enrollments (plan_id, user_id, start_at, tz)"
            " SELECT $1, 'o-' || lpad(i::text, 7, '0'), now(), 'UTC'"
            " FROM generate_series(1, $2) AS i",
            PLAN_ID,
            users,
        )
        await store.pool.execute(
            "INSERT INTO consent (user_id, template_id, long_term)"
            " SELECT user_id, $2, true FROM enrollments WHERE plan_id = $1",
            PLAN_ID,
            TEMPLATE_ID,
        )


async def run_trial(
    db_url: str,
    workdir: Path,
    *,
    users: int,
    replicas: int = 1,
    sig: int = signal.SIGKILL,
    kills: int = 1,
    concurrency: int = SEND_CONCURRENCY,
    batch_size: int = 500,
    chunk_size: int = 1000,
    lease_seconds: float = 20.0,
    lose_replies: float = 0.0,
    timeout_s: float = 300.0,
    rng: random.Random | None = None,
    restart: bool = True,
    on_kill: object = None,
) -> TrialResult:
    """One trial on a fresh, empty database at `db_url`; see the module docstring.

    `on_kill`, when given, is an async callable run instead of signalling a replica (e.g. a
    PostgreSQL restart); `restart=False` leaves a killed replica down (the others finish)."""
    rng = rng or random.Random()
    plans_dir = workdir / "plans"
    plans_dir.mkdir(parents=True, exist_ok=True)
    (plans_dir / "policy.yaml").write_text(PERMISSIVE_POLICY)
    start = (datetime.now(UTC) + timedelta(seconds=8 + replicas)).replace(microsecond=0)
    (plans_dir / f"{PLAN_ID}.yaml").write_text(plan_text(start))
    await enrol(db_url, plans_dir, users)

    fake = FakeProcess()
    if lose_replies:
        await fake.lose_replies(lose_replies, latency_s=3.0)
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REMINDERS_PLANS_DIR": str(plans_dir),
        "REMINDERS_WECHAT_API_BASE": fake.url,
        "REMINDERS_WECHAT_APPID": "wx-trial",
        "REMINDERS_WECHAT_SECRET": "secret",
        "REMINDERS_WECHAT_TIMEOUT": "1.5",
        "REMINDERS_SEND_CONCURRENCY": str(concurrency),
        "REMINDERS_BATCH_SIZE": str(batch_size),
        "REMINDERS_CHUNK_SIZE": str(chunk_size),
        "REMINDERS_LEASE_SECONDS": str(lease_seconds),
        "REMINDERS_API_PORT": "0",
        "REMINDERS_LOG_LEVEL": "INFO",
    }
    fleet = [Replica(f"r{i}", env, workdir / f"r{i}.log") for i in range(replicas)]
    conn = Monitor(db_url)
    began = time.monotonic()
    try:
        for replica in fleet:
            replica.start()
        signals = 0
        # Increasing moments, so that each signal lands in a fan-out under way again.
        for target in sorted(rng.uniform(0.05, 0.9) * users for _ in range(kills)):
            await _until(
                lambda t=target: _recorded_at_least(conn, t), timeout_s, "the fan-out under way"
            )
            if on_kill is not None:
                await on_kill()  # type: ignore[operator]
            else:
                victim = await _busiest(conn, fleet)
                victim.signal(sig)
                if restart:
                    victim.start()
            signals += 1
        await _until(lambda: _finished(conn, users), timeout_s, "every user's final outcome")
        seconds = time.monotonic() - began
        result = await _count(conn, fake, users, signals, seconds)
        result.exit_codes = [code for r in fleet for code in r.exit_codes]
        result.down = sum(1 for r in fleet if r.proc is None or r.proc.poll() is not None)
    finally:
        await conn.close()
        for replica in fleet:
            replica.stop()
        fake.stop()
    return result


async def _until(check, within_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + within_s
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {within_s} s waiting for {what}")
        await asyncio.sleep(0.02)


async def _recorded_at_least(conn: Monitor, n: float) -> bool:
    return await conn.fetchval("SELECT count(*) FROM deliveries") >= n


async def _busiest(conn: Monitor, fleet: list[Replica]) -> Replica:
    """The replica holding chunks now (else the first): the one a kill hurts most."""
    owners = Counter(
        r["owner"]
        for r in await conn.fetch("SELECT owner FROM occurrence_chunks WHERE owner IS NOT NULL")
    )
    by_name = {r.name: r for r in fleet}
    for name, _ in owners.most_common():
        if name in by_name and by_name[name].proc and by_name[name].proc.poll() is None:
            return by_name[name]
    return fleet[0]


async def _finished(conn: Monitor, users: int) -> bool:
    row = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status NOT IN ('pending', 'deferred')) AS final,"
        " count(*) FILTER (WHERE status IN ('pending', 'deferred')) AS open,"
        " (SELECT count(*) FROM occurrences WHERE state = 'running') AS running"
        " FROM deliveries"
    )
    return row["final"] >= users and row["open"] == 0 and row["running"] == 0


async def _count(
    conn: Monitor, fake: FakeProcess, users: int, signals: int, seconds: float
) -> TrialResult:
    received = Counter(m["touser"] for m in await fake.messages())
    ledger = await conn.fetch(
        "SELECT e.user_id, count(d.id) FILTER (WHERE d.status NOT IN ('pending', 'deferred'))"
        " AS final FROM enrollments e LEFT JOIN deliveries d"
        "  ON d.plan_id = e.plan_id AND d.user_id = e.user_id"
        " WHERE e.plan_id = $1 GROUP BY e.user_id",
        PLAN_ID,
    )
    statuses = Counter(
        {
            r["status"]: r["n"]
            for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM deliveries GROUP BY status"
            )
        }
    )
    shares = {
        r["claimed_by"]: r["n"]
        for r in await conn.fetch(
            "SELECT claimed_by, count(*) AS n FROM deliveries WHERE status = 'sent'"
            " GROUP BY claimed_by"
        )
    }
    return TrialResult(
        users=users,
        signals=signals,
        duplicates=sum(n - 1 for n in received.values() if n > 1),
        lost=sum(1 for r in ledger if r["final"] != 1),
        unknown=statuses["unknown"],
        pending=statuses["pending"] + statuses["deferred"],
        seconds=seconds,
        shares=shares,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--users", type=int, default=20_000)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--kills", type=int, default=1)
    parser.add_argument("--signal", choices=["KILL", "TERM"], default="KILL")
    parser.add_argument("--concurrency", type=int, default=SEND_CONCURRENCY)
    parser.add_argument("--lose-replies", type=float, default=0.0)
    parser.add_argument("--lease-seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    args = parser.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory(prefix="crash-trials-") as tmp:
        server_url = args.database_url
        if server_url is None:
            from scheduler.store.embedded import start_embedded

            server_url = start_embedded(Path(tmp) / "pgdata")
        admin = await asyncpg.connect(server_url)
        results: list[TrialResult] = []
        try:
            for n in range(args.trials):
                name = f"crash_{os.getpid()}_{n}"
                await admin.execute(f'CREATE DATABASE "{name}"')
                db_url = urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
                try:
                    result = await run_trial(
                        db_url,
                        Path(tmp) / f"trial{n}",
                        users=args.users,
                        replicas=args.replicas,
                        sig=getattr(signal, f"SIG{args.signal}"),
                        kills=args.kills,
                        concurrency=args.concurrency,
                        lease_seconds=args.lease_seconds,
                        lose_replies=args.lose_replies,
                        rng=rng,
                    )
                finally:
                    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                results.append(result)
                print(f"trial {n + 1}: {result.line()}", flush=True)
        finally:
            await admin.close()
    print(
        f"total: duplicates={sum(r.duplicates for r in results)} "
        f"lost={sum(r.lost for r in results)} unknown={sum(r.unknown for r in results)} "
        f"pending={sum(r.pending for r in results)} "
        f"finish_s max={max(r.seconds for r in results):.1f}"
    )
    print(
        f"trials={len(results)} users={args.users} "
        f"duplicates={sum(r.duplicates for r in results)} "
        f"lost={sum(r.lost for r in results)} max_unknown={max(r.unknown for r in results)}"
    )


if __name__ == "__main__":
    asyncio.run(main())
