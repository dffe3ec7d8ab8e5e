"""Fan-out benchmark: one occurrence of a calendar plan sent to N users, end to end.

    .venv/bin/python bench/fanout.py --users 100000 [--concurrency 256] [--batch-size 500]
        [--chunk-size 1000] [--fanout-workers 0] [--replicas 1] [--send-rate 0] [--profile FILE]

Registers a daily long-term `transport` plan in a fresh database (`bench_<random>` on the server
of --database-url / DATABASE_URL, else on an embedded PostgreSQL in a temp dir), bulk-loads N
enrolments and N long-term consents with COPY (not timed), starts the fake WeChat in a subprocess
(its own core where there are two; keep_messages off), and times `Dispatcher.fire` for one real
occurrence of the plan: audience pages, ledger claims with consent, HTTP sends and result writes.
By default that is the fire's own pipeline alone. With --fanout-workers W the fire is joined by W
chunk loops, as the daemon's REMINDERS_FANOUT_WORKERS loops join it within a poll period (the
daemon's default is 2): each takes free chunks of the occurrence, a pipeline of its own, and all
share the replica's send slots. It then checks that N rows are `sent` in the ledger and that the
fake counted N sends.

Against the same fake, same concurrency, no database, it measures the channel's own HTTP client
(`channel_loop`) and a bare aiohttp loop (`aiohttp_loop`) posting the same messages (the first
min(N, --baseline-max) of them). The last line printed is

    users=N sends_per_s=S channel_per_s=C raw_per_s=B ratio=R raw_ratio=Q peak_rss_mb=M
        cpu_us=F channel_cpu_us=U raw_cpu_us=W fake_cpu_us=X db_cpu_us=D pinned=P

with ratio = S / C and raw_ratio = S / B, where C and B are the means of the channel alone and of
the bare aiohttp loop just before and just after the fan-out (the machine's speed drifts over a
long run; a warning says when either baseline moved by more than a fifth, and such a run's ratios
are unreliable). F, U and W are this process's CPU microseconds per send (time.process_time) in the
fan-out, the channel loop and the bare aiohttp loop (means of before and after): unlike the rates
they barely move when other work shares the machine. X and D are the CPU microseconds per send,
during the fan-out, of the fake WeChat and of the embedded PostgreSQL (all its processes; D is n/a
for a --database-url server): they share the other core, and when their sum times S nears a whole
core, that core is the bottleneck, not this process. A human line before the last gives each core's
ceiling: the sends/s (and raw_ratio) it would allow at 100 % at the CPU per send measured, F for
this process and X + D for the other core. P is 1 when the fake and the embedded PostgreSQL were
pinned to the other core; when this process sees fewer than two cores (under taskset, say) nothing
is pinned, a warning says so on stdout and stderr, and P is 0. Loopback only; everything started is
stopped and the database dropped on the way out, also on error or after --timeout seconds.

With --replicas K > 1 the occurrence is worked by K replicas instead of this process: after the
baselines, K worker subprocesses (this file with --worker; replica ids r0..r{K-1}) each open a
Store on the bench database, a WeChatChannel to the same fake and a Dispatcher with the same
concurrency and batch size (each), warm their channel up and wait. This process then records the
occurrence (`store.fanout.record_occurrence`, in chunks of --chunk-size users, as `fire` does),
sends the workers the start signal (a line on their stdin) and times from just before the record
until every worker has reported (its last send finished); each worker runs 1 + --fanout-workers
loops of `Dispatcher.work()` until the occurrence is done (it returns when no chunk is free, which
may be while others still hold chunks, so it is called again after a short sleep). It prints each
replica's share of the ledger's `sent` rows, runs the same checks (ledger sent == fake sends ==
N) and ends with

    users=N replicas=K sends_per_s=S channel_per_s=C raw_per_s=B ratio=R raw_ratio=Q
        peak_rss_mb=M shares=r0:n0,r1:n1,... cpu_us=F channel_cpu_us=U raw_cpu_us=W pinned=P

(one line), where ratio is still against the single-process channel baseline and peak_rss_mb
and cpu_us are the largest replica's. The replicas are not pinned: they share the machine's
cores with the fake WeChat and PostgreSQL, so on a 2-core box this is a functional figure (the
work is shared, every user is sent exactly once), not a scaling one.

With --send-rate R every dispatcher (each replica's) takes its sends from one bucket of R a
second in PostgreSQL, as the daemon does under REMINDERS_SEND_RATE: sends_per_s shows the limit
holding for all replicas together.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
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
from scheduler.app.daemon import settle_heap
from scheduler.app.dispatcher import Dispatcher, FanOutReport, occurrence_key
from scheduler.channels.base import OutgoingMessage
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.messages import render
from scheduler.domain.plan import Plan
from scheduler.domain.schedule import calendar_anchor, calendar_occurrences
from scheduler.settings import SEND_CONCURRENCY, Settings
from scheduler.store.embedded import start_embedded
from scheduler.store.postgres import SendRate, Store

SCRIPT = str(Path(__file__).resolve())  # what --replicas K > 1 runs with --worker
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
    await store.register_plan(PLAN, "bench")
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


def tree_cpu_s(pid: int | None) -> float:
    """CPU seconds used so far by process `pid` and its children (PostgreSQL's backends are
    the postmaster's children); 0 where /proc cannot tell (not Linux, or no such process)."""
    if pid is None:
        return 0.0
    total = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def first_occurrence(store: Store) -> tuple[datetime, int]:
    """The plan's first occurrence (its fire time and step): the one the benchmark fans out."""
    cal = PLAN.schedule.calendar
    assert cal is not None
    record = await store.plan(PLAN.id)
    assert record is not None
    first = next(calendar_occurrences(cal, calendar_anchor(cal, record.registered_at)))
    return first.due_at, first.step


async def stop_process(process: asyncio.subprocess.Process) -> None:
    """Terminate a subprocess this script started (kill it after 10 s) and reap it."""
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


def warn_unpinned(cpus: list[int]) -> None:
    """Say loudly that nothing is pinned: the fake WeChat and PostgreSQL then take their CPU from
    the fan-out's own core, and every figure (and ratio) is lower than on two free cores."""
    seen = f"only CPU {cpus[0]}" if cpus else "no CPU affinity (os.sched_getaffinity)"
    banner = "!" * 78
    message = (
        f"{banner}\nWARNING: NOT PINNED. This process sees {seen}: started under taskset or in "
        "a\none-core container? The fake WeChat and the embedded PostgreSQL run on the same "
        "core(s)\nas the fan-out, so sends/s, the baselines and the ratios are NOT comparable "
        f"with a\npinned run (the last line says pinned=0).\n{banner}"
    )
    print(message, file=sys.stderr, flush=True)
    print(message, flush=True)


DRIFT_WARNING = 0.2  # a baseline's before and after further apart than this: say so


def warn_drift(name: str, before: float, after: float) -> None:
    """A baseline that moved by more than DRIFT_WARNING over the run: the machine's speed
    changed under it, and this run's ratios are worth less than a steadier run's."""
    drift = abs(after - before) / max(min(before, after), 1e-9)
    if drift > DRIFT_WARNING:
        message = (
            f"WARNING: the {name} baseline moved by {drift:.0%} between before and after the "
            "fan-out: the machine's speed drifted during this run, so its ratios are unreliable"
        )
        print(message)
        print(message, file=sys.stderr)


async def fire_as_the_daemon_does(
    dispatcher: Dispatcher, fire_time: datetime, fanout_workers: int
) -> FanOutReport:
    """The fire, joined by the replica's `fanout_workers` chunk loops, as in the daemon (there
    they take free chunks of any occurrence within REMINDERS_WORK_POLL_SECONDS; here at once):
    each loop is a pipeline of its own, so one chunk's batches are rendered and claimed while
    another's are, and all of them share the replica's send slots."""
    fired = asyncio.create_task(dispatcher.fire(PLAN.id, fire_time))

    async def join() -> FanOutReport:
        report = FanOutReport()
        while not fired.done():
            await dispatcher.work(report)  # returns when no chunk is free
            await asyncio.sleep(0.005)
        return report

    joined = asyncio.gather(*(join() for _ in range(fanout_workers)))  # running from now on
    return merged([await fired, *await joined])


def merged(reports: list[FanOutReport]) -> FanOutReport:
    """The reports of a replica's pipelines as one."""
    total = FanOutReport()
    for r in reports:
        total.sent += r.sent
        total.failed += r.failed
        total.already_claimed += r.already_claimed
        total.missed += r.missed
        for key, count in r.gate.items():
            total.gate[key] = total.gate.get(key, 0) + count
    return total


def send_rate(args: argparse.Namespace) -> SendRate | None:
    return SendRate("bench", args.send_rate) if args.send_rate else None


async def bench(
    args: argparse.Namespace,
    db_url: str,
    base_url: str,
    cpus: list[int],
    workers: list[asyncio.subprocess.Process],
    others: dict[str, int | None],
) -> str:
    """`others`: the pids of the fake WeChat ("fake") and of an embedded PostgreSQL's postmaster
    ("db", None for a server of --database-url), whose CPU per send is reported too."""
    n, concurrency = args.users, args.concurrency
    async with Store.open(db_url, max_size=args.pool_size) as store:
        started = time.perf_counter()
        await store.migrate()
        await load(store, db_url, n)
        print(f"setup: {n} enrolments + consents loaded in {time.perf_counter() - started:.1f} s")

        fire_time, step = await first_occurrence(store)
        baseline = messages(fire_time, step, min(n, args.baseline_max))

        channel = WeChatChannel(base_url, "bench", "bench")
        try:
            await channel_loop(channel, baseline[:500], concurrency)  # token and pool warm-up
            cpu = time.process_time()
            channel_per_s = await channel_loop(channel, baseline, concurrency)
            channel_us = cpu_us(cpu, len(baseline))
            token = await _fetch_token(base_url)
            cpu, fake_cpu = time.process_time(), tree_cpu_s(others["fake"])
            raw_per_s = await aiohttp_loop(base_url, token, baseline, concurrency)
            raw_us = cpu_us(cpu, len(baseline))
            raw_fake_us = (tree_cpu_s(others["fake"]) - fake_cpu) / len(baseline) * 1e6
            print(
                f"baselines over {len(baseline)} messages (min(N, {args.baseline_max})), "
                f"concurrency {concurrency}: channel {channel_per_s:.0f}/s "
                f"({channel_us:.0f} us CPU/send), bare aiohttp {raw_per_s:.0f}/s "
                f"({raw_us:.0f} us CPU/send; the fake WeChat {raw_fake_us:.0f} us CPU/request)"
            )

            # The baselines' messages are the benchmark's own garbage: with 50,000 of them alive,
            # every full GC pass during the fan-out would walk them too.
            del baseline
            settle_heap()  # as the daemon does once it has started

            if args.replicas > 1:
                line = await replicated(
                    args, store, db_url, base_url, cpus, workers, channel_per_s, raw_per_s
                )
                return (
                    f"{line} channel_cpu_us={channel_us:.0f} raw_cpu_us={raw_us:.0f} "
                    f"pinned={int(len(cpus) >= 2)}"
                )
            dispatcher = Dispatcher(
                store,
                channel,
                replica_id="bench",
                concurrency=concurrency,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                clock=lambda: fire_time,
                send_rate=send_rate(args),
            )
            sends_before = await fake_sends(base_url)
            profiler = cProfile.Profile() if args.profile else None
            others_before = {name: tree_cpu_s(pid) for name, pid in others.items()}
            started, cpu = time.perf_counter(), time.process_time()
            if profiler:
                profiler.enable()
            report = await fire_as_the_daemon_does(dispatcher, fire_time, args.fanout_workers)
            elapsed = time.perf_counter() - started
            others_us = {
                name: (tree_cpu_s(pid) - others_before[name]) / max(report.sent, 1) * 1e6
                for name, pid in others.items()
            }
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
                print(f"profile of the fan-out written to {args.profile} (read it with pstats)")
            fire_us = cpu_us(cpu, max(report.sent, 1))
            faked = await fake_sends(base_url) - sends_before
            # Both baselines once more: the machine's speed drifts over a long run, so the
            # ratios are taken against the mean of each before and after the fan-out.
            again = messages(fire_time, step, min(n, args.baseline_max))
            cpu = time.process_time()
            channel_after = await channel_loop(channel, again, concurrency)
            channel_after_us = cpu_us(cpu, len(again))
            cpu = time.process_time()
            raw_after = await aiohttp_loop(base_url, token, again, concurrency)
            raw_after_us = cpu_us(cpu, len(again))
            del again
            for name, before, after, before_us, after_us in (
                ("channel", channel_per_s, channel_after, channel_us, channel_after_us),
                ("bare aiohttp", raw_per_s, raw_after, raw_us, raw_after_us),
            ):
                print(
                    f"{name} alone: {before:.0f}/s before, {after:.0f}/s after "
                    f"({before_us:.0f} and {after_us:.0f} us CPU/send)"
                )
                warn_drift(name, before, after)
            channel_per_s = (channel_per_s + channel_after) / 2
            channel_us = (channel_us + channel_after_us) / 2
            raw_per_s = (raw_per_s + raw_after) / 2
            raw_us = (raw_us + raw_after_us) / 2
        finally:
            await channel.aclose()
        sends_per_s = report.sent / elapsed
        print(
            f"fire {fire_time.isoformat()} (step {step}): {report.outcomes} in {elapsed:.2f} s "
            f"= {sends_per_s:.0f} sends/s ({fire_us:.0f} us CPU/send in this process; "
            f"batch {args.batch_size}, concurrency {concurrency})"
        )
        # The other core's share: when it is busy all the time, it is the bottleneck.
        fake_us, db_us = others_us["fake"], others_us["db"] if others["db"] else None
        print(
            f"the other core per send: fake WeChat {fake_us:.0f} us CPU, "
            + (f"PostgreSQL {db_us:.0f} us CPU" if db_us is not None else "PostgreSQL n/a")
            + f" (busy {(fake_us + (db_us or 0)) * sends_per_s / 1e6:.0%} of a core)"
        )
        # What each core allows at 100 %: a raw_ratio above the lower ceiling cannot be had by
        # any change to this process alone.
        ceilings = {"this process": fire_us}
        if db_us is not None:
            ceilings["the other core"] = fake_us + db_us
        print(
            "ceilings at 100 % of a core: "
            + ", ".join(
                f"{name} {1e6 / us:.0f} sends/s (raw_ratio {1e6 / us / raw_per_s:.2f})"
                for name, us in ceilings.items()
            )
        )

        ledger = await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'sent'")
        print(f"checks: report.sent={report.sent} ledger sent={ledger} fake sends={faked} (N={n})")
        if not report.sent == ledger == faked == n:
            raise SystemExit("FAILED: every user must be sent exactly one message")

    rss = peak_rss_mb()
    print(f"peak RSS of this process: {rss:.0f} MB")
    return (
        f"users={n} sends_per_s={sends_per_s:.0f} channel_per_s={channel_per_s:.0f} "
        f"raw_per_s={raw_per_s:.0f} ratio={sends_per_s / channel_per_s:.2f} "
        f"raw_ratio={sends_per_s / raw_per_s:.2f} peak_rss_mb={rss:.0f} "
        f"cpu_us={fire_us:.0f} channel_cpu_us={channel_us:.0f} raw_cpu_us={raw_us:.0f} "
        f"fake_cpu_us={fake_us:.0f} db_cpu_us={'n/a' if db_us is None else f'{db_us:.0f}'} "
        f"pinned={int(len(cpus) >= 2)}"
    )


async def replicated(
    args: argparse.Namespace,
    store: Store,
    db_url: str,
    base_url: str,
    cpus: list[int],
    workers: list[asyncio.subprocess.Process],
    channel_per_s: float,
    raw_per_s: float,
) -> str:
    """--replicas K > 1: K worker processes share the occurrence's chunks; this one records it,
    gives the start signal and waits for the occurrence to be done."""
    n, k = args.users, args.replicas
    fire_time, step = await first_occurrence(store)
    replicas = [f"r{i}" for i in range(k)]
    for replica in replicas:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--worker",
            "--fake-url",
            base_url,
            "--replica-id",
            replica,
            "--concurrency",
            str(args.concurrency),
            "--batch-size",
            str(args.batch_size),
            "--chunk-size",
            str(args.chunk_size),
            "--fanout-workers",
            str(args.fanout_workers),
            "--pool-size",
            str(args.pool_size),
            "--send-rate",
            str(args.send_rate),
            "--timeout",
            str(args.timeout),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "DATABASE_URL": db_url},  # not on the command line
        )
        workers.append(process)
        if len(cpus) >= 2:  # this process is pinned to one core: the replicas use them all
            os.sched_setaffinity(process.pid, set(cpus))
    for replica, process in zip(replicas, workers, strict=True):
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 120)
        if line.strip() != b"ready":
            raise SystemExit(f"FAILED: replica {replica} did not start ({line!r})")
    pids = ", ".join(f"{r} pid {w.pid}" for r, w in zip(replicas, workers, strict=True))
    print(f"replicas: {k} workers ready ({pids})")

    sends_before = await fake_sends(base_url)
    started = time.perf_counter()
    occurrence_id = await store.fanout.record_occurrence(
        PLAN.id, occurrence_key(fire_time), step, fire_time, args.chunk_size
    )
    for process in workers:
        assert process.stdin is not None
        process.stdin.write(f"go {occurrence_id}\n".encode())
    await asyncio.gather(*(w.stdin.drain() for w in workers if w.stdin is not None))
    while True:
        state = await store.pool.fetchval(
            "SELECT state FROM occurrences WHERE id = $1", occurrence_id
        )
        if state == "done":
            break
        for replica, process in zip(replicas, workers, strict=True):
            if process.returncode is not None:
                raise SystemExit(
                    f"FAILED: replica {replica} exited ({process.returncode}) before the "
                    "occurrence was done"
                )
        await asyncio.sleep(0.01)
    # An occurrence is done once its audience is claimed; its last sends finish after that,
    # when each replica's work returns and it prints its report.
    lines = []
    for process in workers:
        assert process.stdout is not None
        lines.append(await asyncio.wait_for(process.stdout.readline(), args.timeout))
    elapsed = time.perf_counter() - started

    results: dict[str, dict[str, Any]] = {}
    for replica, process, line in zip(replicas, workers, lines, strict=True):
        if await asyncio.wait_for(process.wait(), 60) != 0 or not line:
            raise SystemExit(f"FAILED: replica {replica} exited with {process.returncode}")
        results[replica] = json.loads(line)
    outcomes: dict[str, int] = {}
    for result in results.values():
        for key, count in result["outcomes"].items():
            outcomes[key] = outcomes.get(key, 0) + count
    sent = outcomes["sent"]
    sends_per_s = sent / elapsed
    print(
        f"fire {fire_time.isoformat()} (step {step}) by {k} replicas: {outcomes} in "
        f"{elapsed:.2f} s = {sends_per_s:.0f} sends/s (batch {args.batch_size}, concurrency "
        f"{args.concurrency} each, chunks of {args.chunk_size})"
    )
    rows = await store.pool.fetch(
        "SELECT claimed_by, count(*) AS n FROM deliveries WHERE status = 'sent'"
        " GROUP BY 1 ORDER BY 1"
    )
    shares = {replica: 0 for replica in replicas} | {r["claimed_by"]: r["n"] for r in rows}
    for replica, result in results.items():
        print(
            f"{replica}: {shares.get(replica, 0)} sent in the ledger ({result['outcomes']}), "
            f"{result['cpu_us']:.0f} us CPU/send, peak RSS {result['peak_rss_mb']:.0f} MB"
        )
    if any(shares[replica] == 0 for replica in replicas):
        print("note: a replica sent nothing (fewer chunks than replicas, or one took them all)")

    ledger = sum(shares.values())
    faked = await fake_sends(base_url) - sends_before
    print(f"checks: reports sent={sent} ledger sent={ledger} fake sends={faked} (N={n})")
    if not sent == ledger == faked == n or set(shares) != set(replicas):
        raise SystemExit("FAILED: every user must be sent exactly one message")

    rss = max(result["peak_rss_mb"] for result in results.values())
    print(f"peak RSS: largest replica {rss:.0f} MB, this process {peak_rss_mb():.0f} MB")
    return (
        f"users={n} replicas={k} sends_per_s={sends_per_s:.0f} "
        f"channel_per_s={channel_per_s:.0f} raw_per_s={raw_per_s:.0f} "
        f"ratio={sends_per_s / channel_per_s:.2f} raw_ratio={sends_per_s / raw_per_s:.2f} "
        f"peak_rss_mb={rss:.0f} shares={','.join(f'{r}:{shares[r]}' for r in replicas)} "
        f"cpu_us={max(result['cpu_us'] for result in results.values()):.0f}"
    )


async def worker(args: argparse.Namespace) -> None:
    """One replica of --replicas (run by the benchmark with --worker): ready, then on `go ID` on
    stdin work on the occurrence's chunks until it is done, then print its report as JSON."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    db_url = args.database_url or os.environ["DATABASE_URL"]
    async with asyncio.timeout(args.timeout), Store.open(db_url, max_size=args.pool_size) as store:
        fire_time, step = await first_occurrence(store)
        channel = WeChatChannel(args.fake_url, "bench", "bench")
        try:
            await channel_loop(channel, messages(fire_time, step, 200), args.concurrency)  # warm-up
            dispatcher = Dispatcher(
                store,
                channel,
                replica_id=args.replica_id,
                concurrency=args.concurrency,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                clock=lambda: fire_time,
                send_rate=send_rate(args),
            )
            settle_heap()
            print("ready", flush=True)
            line = (await stdin.readline()).decode().split()
            if len(line) != 2 or line[0] != "go":
                return  # the benchmark went away before the start
            occurrence_id = int(line[1])

            async def loop() -> FanOutReport:  # one of the replica's chunk loops
                report = FanOutReport()
                while True:
                    await dispatcher.work(report)  # returns when no chunk is free
                    state = await store.pool.fetchval(
                        "SELECT state FROM occurrences WHERE id = $1", occurrence_id
                    )
                    if state == "done":
                        return report
                    await asyncio.sleep(0.02)  # other replicas still hold chunks

            cpu = time.process_time()
            # As in the daemon: the loop that would have fired it, and the fanout workers.
            report = merged(await asyncio.gather(*(loop() for _ in range(1 + args.fanout_workers))))
            cpu_per_send = cpu_us(cpu, max(report.sent, 1))
        finally:
            await channel.aclose()
    result = {"outcomes": report.outcomes, "cpu_us": cpu_per_send, "peak_rss_mb": peak_rss_mb()}
    print(json.dumps(result), flush=True)


async def main(args: argparse.Namespace) -> str:
    temp_dir: Path | None = None
    server_url = args.database_url or os.environ.get("DATABASE_URL")
    database = f"bench_{secrets.token_hex(6)}"
    created = False
    fake: asyncio.subprocess.Process | None = None
    workers: list[asyncio.subprocess.Process] = []  # --replicas K > 1
    try:
        async with asyncio.timeout(args.timeout):
            if not server_url:
                temp_dir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
                server_url = await asyncio.to_thread(start_embedded, temp_dir / "pgdata")
            await admin_execute(server_url, f"CREATE DATABASE {database}")
            created = True
            fake, base_url = await _start_fake()
            cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
            db_pid = None
            if temp_dir is not None:
                import pgserver

                db_pid = pgserver.get_server(temp_dir / "pgdata").get_pid()
            if len(cpus) < 2:
                warn_unpinned(cpus)
            else:
                # This process on a core of its own, as the daemon would be beside a database
                # server and WeChat elsewhere: the fake and an embedded PostgreSQL (its server
                # processes are forked from the postmaster, so they follow it) share the other.
                _pin(fake.pid, cpus[1])
                if db_pid is not None:
                    _pin(db_pid, cpus[1])
                _pin(0, cpus[0])
            print(f"database {database}, fake WeChat at {base_url} (pid {fake.pid})")
            db_url = with_database(server_url, database)
            others = {"fake": fake.pid, "db": db_pid}
            return await bench(args, db_url, base_url, cpus, workers, others)
    except TimeoutError:
        raise SystemExit(
            f"ABORTED: the benchmark did not finish within --timeout {args.timeout:.0f} s"
        ) from None
    finally:
        await asyncio.gather(*(stop_process(process) for process in workers))
        if fake is not None:
            await stop_process(fake)
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
    parser.add_argument("--concurrency", type=int, default=SEND_CONCURRENCY)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--pool-size", type=int, default=10, help="asyncpg pool max_size")
    parser.add_argument("--chunk-size", type=int, default=1000, help="users per occurrence chunk")
    parser.add_argument(
        "--fanout-workers",
        type=int,
        default=0,
        help="chunk loops that join the fire, as REMINDERS_FANOUT_WORKERS's do in the daemon"
        f" (its default: {Settings.model_fields['fanout_workers'].default}; 0: the fire alone)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="replicas working on the occurrence: 1 is this process, K > 1 are K subprocesses",
    )
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
    parser.add_argument(
        "--send-rate",
        type=float,
        default=0.0,
        help="REMINDERS_SEND_RATE: sends per second, all replicas together (0: no limit)",
    )
    parser.add_argument("--profile", help="write a cProfile of the fan-out to this file")
    parser.add_argument("--timeout", type=float, default=900.0, help="abort after this many s")
    # One replica of --replicas K > 1, started by the benchmark itself (the bench database's URL
    # comes in DATABASE_URL).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fake-url", help=argparse.SUPPRESS)
    parser.add_argument("--replica-id", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        if not args.fake_url or not args.replica_id:
            parser.error("--worker needs --fake-url and --replica-id")
        asyncio.run(worker(args))
        return
    if not 1 <= args.users <= 1_000_000:
        parser.error("--users must be between 1 and 1,000,000")
    if not 1 <= args.replicas <= 16:
        parser.error("--replicas must be between 1 and 16")
    if args.chunk_size < 1:
        parser.error("--chunk-size must be at least 1")
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # platformdirs, via pgserver
    print(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
