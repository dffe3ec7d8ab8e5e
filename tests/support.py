"""What the tests share: one hand-moved clock, sample plans and users, registering plans, an
empty database between generated examples, dispatchers, a daemon in this process and as a child
process. Tests import helpers from here (and fixtures from tests/ops_helpers.py), never from each
other."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar
from zoneinfo import ZoneInfo

import httpx
from apscheduler import AsyncScheduler

from scheduler.app.daemon import Daemon, build_scheduler, schedule_id
from scheduler.app.dispatcher import Dispatcher
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.plan import Plan
from scheduler.domain.schedule import relative_due
from scheduler.settings import Settings
from scheduler.store.postgres import Store

Now = TypeVar("Now", datetime, float)


class Clock(Generic[Now]):
    """Virtual time: the code under test calls it, the test sets `now`."""

    def __init__(self, now: Now):
        self.now = now

    def __call__(self) -> Now:
        return self.now


def plan_of(document: dict[str, Any]) -> Plan:
    return Plan.model_validate(document)


async def register(store: Store, plan: Plan) -> None:
    """Load a plan as the daemon would from a file (source `test`)."""
    await store.register_plan(plan, "test")


async def reset_database(store: Store) -> None:
    """Hypothesis runs many examples in one test (one database): start each from empty."""
    tables = await store.pool.fetch(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        " AND tablename <> 'schema_migrations'"
    )
    names = ", ".join(f'"{t["tablename"]}"' for t in tables)
    await store.pool.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")


# --- plans and users -------------------------------------------------------------------------


T0 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # Monday 09:00 in Shanghai


USERS = [f"o-{i:02d}" for i in range(6)]


def calendar_plan(consent: str = "long_term") -> Plan:
    return Plan.model_validate(
        {
            "id": "alerts",
            "name": "Alerts",
            "category": "transport",
            "consent": consent,
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": "09:00"},
                    "start": "2026-03-01",
                }
            },
            "template": {"id": "tmpl_alert", "fields": {"thing1": "thing", "number2": "number"}},
            "message": {"default": {"thing1": "Alert for {who}", "number2": "{step}"}},
            "variables": ["who"],
        }
    )


def weekly_relative(grace: str = "2 hours") -> Plan:
    return Plan.model_validate(
        {
            "id": "rehab",
            "name": "Rehab",
            "category": "medical",
            "consent": "one_time",
            "schedule": {
                "relative": {"every": "1 week", "count": 3, "at": "09:00"},
                "grace": grace,
            },
            "template": {"id": "tmpl_rehab", "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": "Week {step} 仅供参考"}},
        }
    )


def daily(grace: str = "1 hour", consent: str = "long_term", **calendar) -> Plan:
    return Plan.model_validate(
        {
            "id": "daily",
            "name": "Daily",
            "category": "transport",
            "consent": consent,
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": "09:00"},
                    "start": "2026-03-01",
                    **calendar,
                },
                "grace": grace,
            },
            "template": {"id": "tmpl", "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": "Day {step}"}},
        }
    )


DAILY = """
id: daily
name: Daily
category: transport
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    daily: {{at: "{at}"}}
    start: 2026-03-01
    count: {count}
template: {{id: tmpl, fields: {{thing1: thing}}}}
message: {{default: {{thing1: "Day {{step}}"}}}}
"""


# --- the send pipeline -----------------------------------------------------------------------


async def ledger(store: Store, plan_id: str) -> list[dict]:
    rows = await store.pool.fetch(
        "SELECT occurrence, user_id, step, status, reason, errcode, msgid, message"
        " FROM deliveries WHERE plan_id = $1 ORDER BY occurrence, user_id",
        plan_id,
    )
    return [dict(r) for r in rows]


def dispatcher(
    store: Store, channel: WeChatChannel, clock: Clock, *, replica_id: str = "test", **kw
) -> Dispatcher:
    return Dispatcher(store, channel, replica_id=replica_id, clock=clock, **kw)


async def audience(store, plan: Plan, users=USERS, *, credits: int = 5) -> None:
    start = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    for user in users:
        due = None
        if plan.schedule.relative is not None:
            due = relative_due(plan.schedule.relative, start, ZoneInfo("Asia/Shanghai"), 0)
        await store.enroll(plan.id, user, start, "Asia/Shanghai", {}, due)
        kind = plan.consent.value
        for _ in range(credits if kind == "one_time" else 1):
            await store.record_consent(user, plan.template.id, kind, "accept", "test")


async def enrol(store, plan: Plan, users: list[str]) -> None:
    for user in users:
        await store.enroll(plan.id, user, T0, "Asia/Shanghai", {"who": user}, None)
        await store.record_consent(user, plan.template.id, "long_term", "accept", "test")


# --- a daemon in this process, over a real APScheduler ----------------------------------------


@asynccontextmanager
async def daemon_on(store: Store, db_url: str) -> AsyncIterator[Daemon]:
    """A Daemon over a real APScheduler on the test database (entered and left in one task,
    as anyio's cancel scopes require, so not a fixture)."""
    async with AsyncExitStack() as stack:
        scheduler = await build_scheduler(store, db_url, "sync-test", stack)
        channel = WeChatChannel(base_url="http://127.0.0.1:9", appid="a", secret="s")  # unused
        stack.push_async_callback(channel.aclose)
        yield Daemon(
            Settings(),
            store,
            channel,
            scheduler,
            replica_id="sync-test",
            clock=Clock(datetime(2026, 3, 10, 3, 0, tzinfo=UTC)),
        )


async def next_fire(scheduler: AsyncScheduler, plan_id: str) -> datetime:
    return (await scheduler.get_schedule(schedule_id(plan_id))).next_fire_time


# --- the daemon as a process ------------------------------------------------------------------


class DaemonProcess:
    """`reminders run` as a child process against a fake WeChat (the acceptance tests)."""

    def __init__(
        self,
        replica: str,
        db_url: str,
        plans_dir: Path,
        fake_url: str,
        log: Path,
        settings: dict[str, str] | None = None,  # more REMINDERS_* variables
    ):
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REMINDERS_PLANS_DIR": str(plans_dir),
            "REMINDERS_WECHAT_API_BASE": fake_url,
            "REMINDERS_WECHAT_APPID": "wx-test",
            "REMINDERS_WECHAT_SECRET": "secret",
            "REMINDERS_REPLICA_ID": replica,
            "REMINDERS_SWEEP_SECONDS": "1",
            "REMINDERS_BATCH_SIZE": "3",
            "REMINDERS_API_PORT": "0",
            **(settings or {}),
        }
        with log.open("a") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)


async def wait_for(predicate, within_s: float = 40.0, what: str = "condition") -> None:  # noqa: ANN001
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


async def fake_messages(fake_url: str) -> list[dict]:
    async with httpx.AsyncClient() as client:
        return (await client.get(f"{fake_url}/fake/messages")).json()
