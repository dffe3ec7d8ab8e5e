"""Operating a running daemon process, like an admin would, against a fake WeChat process on
loopback and a real PostgreSQL: pause mid-fan-out, resume with skip and with catch-up, opt-out,
cancel, status and metrics against the ledger; and the live plans folder (add, edit, invalid edit,
delete, SIGHUP, `reminders reload`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from scheduler.store.postgres import Store
from tests.ops_helpers import (  # noqa: F401 - a fixture
    eventually,
    fake_url_fixture,
    permissive_policy_in,
)

TICKER = """
id: ticker
name: Ticker
category: transport
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    every: 3 seconds
  grace: 5 seconds
template:
  id: tmpl_tick
  fields: {thing1: thing, number2: number}
message:
  default: {thing1: "Tick for {user}", number2: "{step}"}
"""
LIVE = """
id: live
name: Live
category: transport
consent: long_term
schedule:
  calendar: {timezone: Asia/Shanghai, every: 2 seconds}
template:
  id: tmpl_live
  fields: {thing1: thing}
message:
  default: {thing1: "%s"}
"""
USERS = [f"o-user-{i:02d}" for i in range(24)]
BATCH = 3
TOKEN = "ops-secret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """`reminders run` as a child process, with its HTTP API on a known loopback port."""

    def __init__(self, db_url: str, plans_dir: Path, fake_url: str, log: Path):
        self.port = free_port()
        self.log = log
        self.env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "REMINDERS_PLANS_DIR": str(plans_dir),
            "REMINDERS_WECHAT_API_BASE": fake_url,
            "REMINDERS_WECHAT_APPID": "wx-test",
            "REMINDERS_WECHAT_SECRET": "secret",
            "REMINDERS_REPLICA_ID": "ops-1",
            "REMINDERS_BATCH_SIZE": str(BATCH),
            "REMINDERS_SEND_CONCURRENCY": "2",
            "REMINDERS_API_PORT": str(self.port),
            "REMINDERS_API_TOKENS": json.dumps({"ops": {"token": TOKEN, "scopes": ["admin"]}}),
            "REMINDERS_WATCH_DEBOUNCE_MS": "100",
        }
        with log.open("a") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scheduler.cli", "run"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.api = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", headers=ADMIN)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "scheduler.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def logged(self) -> str:
        return self.log.read_text()

    async def stop(self) -> None:
        await self.api.aclose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


@pytest.fixture
async def running(db_url: str, fake_url: str, tmp_path: Path) -> AsyncIterator:
    started: list[Running] = []
    folder = tmp_path / "plans"
    folder.mkdir()
    permissive_policy_in(folder)

    def start() -> Running:
        daemon = Running(db_url, folder, fake_url, tmp_path / "daemon.log")
        started.append(daemon)
        return daemon

    start.folder = folder  # type: ignore[attr-defined]
    yield start
    for daemon in started:
        await daemon.api.aclose()
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


async def count(store: Store, sql: str, *args: object) -> int:
    return await store.pool.fetchval(sql, *args)


async def full_occurrences_after(store: Store, after: datetime) -> int:
    return await count(
        store,
        "SELECT count(*) FROM (SELECT occurrence FROM deliveries WHERE due_at > $1"
        " GROUP BY occurrence HAVING count(*) FILTER (WHERE status IN ('sent', 'skipped'))"
        " = $2) AS done",
        after,
        len(USERS),
    )


async def no_pending(store: Store) -> bool:
    return not await count(store, "SELECT count(*) FROM deliveries WHERE status = 'pending'")


async def api_ready(daemon: Running) -> bool:
    try:
        return (await daemon.api.get("/readyz")).status_code == 200
    except httpx.TransportError:
        return False


async def test_pause_resume_catch_up_opt_out_cancel_status_and_metrics(store, running, fake_url):
    (running.folder / "ticker.yaml").write_text(TICKER)
    daemon = running()
    await eventually(lambda: api_ready(daemon), 30, "the daemon's API")
    await eventually(lambda: _plan_loaded(store, "ticker"), 10, "the plan loaded")
    for user in USERS:
        await store.enroll("ticker", user, datetime.now(UTC), "Asia/Shanghai", {}, None)
        await store.record_consent(user, "tmpl_tick", "long_term", "accept", "test")
    t0 = datetime.now(UTC)
    await eventually(lambda: _full_after(store, t0, 1), 20, "a first occurrence sent")

    # --- pause mid-fan-out: no new batch is claimed after the pause ---
    async with httpx.AsyncClient() as client:
        await client.post(f"{fake_url}/fake/inject", json={"latency_s": 0.4, "times": 40})
    await eventually(lambda: _pending(store), 10, "a slow fan-out under way")
    response = await daemon.api.post("/v1/plans/ticker/pause", json={"reason": "wrong text"})
    assert response.status_code == 200, response.text
    paused = datetime.fromisoformat(response.json()["at"])
    await eventually(lambda: no_pending(store), 20, "the stopped fan-out's sends answered")
    late_claims = await count(
        store,
        "SELECT count(*) FROM deliveries WHERE claimed_at > $1 AND claimed_by = 'ops-1'",
        paused,
    )
    assert late_claims <= BATCH
    interrupted = await count(
        store,
        "SELECT count(*) FROM (SELECT occurrence FROM deliveries GROUP BY occurrence"
        " HAVING count(*) < $1) AS partial",
        len(USERS),
    )
    assert interrupted >= 1  # the fan-out really stopped midway

    # --- resume with skip: what the pause held back is recorded, nothing stale is sent ---
    await _sleep(4)
    response = await daemon.api.post("/v1/plans/ticker/resume", json={"mode": "skip"})
    assert response.status_code == 200, response.text
    resumed = datetime.fromisoformat(response.json()["at"])
    assert response.json()["details"]["skipped"]
    await eventually(lambda: _full_after(store, resumed, 1), 15, "sending resumed")
    stale = await count(
        store,
        "SELECT count(*) FROM deliveries WHERE status = 'sent' AND due_at > $1 AND due_at < $2"
        " AND claimed_at > $2",
        paused,
        resumed,
    )
    assert stale == 0
    assert await count(store, "SELECT count(*) FROM deliveries WHERE reason = 'paused'") >= len(
        USERS
    )
    incomplete = await count(
        store,
        "SELECT count(*) FROM (SELECT occurrence FROM deliveries WHERE due_at < $1"
        " GROUP BY occurrence HAVING count(*) <> $2) AS gaps",
        resumed,
        len(USERS),
    )
    assert incomplete == 0  # every occurrence up to the resume has one outcome per user

    # --- pause from the CLI; resume with catch-up: within grace sent, the rest missed ---
    done = daemon.cli("pause", "ticker", "--reason", "second look")
    assert done.returncode == 0, done.stderr
    assert "is now paused" in done.stdout and "cli:" in done.stdout
    await _sleep(9)
    response = await daemon.api.post("/v1/plans/ticker/resume", json={"mode": "catch_up"})
    details = response.json()["details"]
    assert details["caught_up"] and details["missed"], details
    for occurrence in details["caught_up"]:
        await eventually(
            lambda o=occurrence: _sent_to_all(store, o), 15, f"catch-up of {occurrence}"
        )
    for occurrence in details["missed"]:
        seen = await store.pool.fetch(
            "SELECT occurrence, status, reason, count(*) FROM deliveries WHERE due_at > $1"
            " GROUP BY 1, 2, 3 ORDER BY 1",
            resumed,
        )
        # Every user has one outcome: missed, or sent when the CLI's pause landed in the middle
        # of this occurrence's fan-out (the rest of it is missed, not sent late).
        outcomes = await store.pool.fetch(
            "SELECT status, reason, count(*) AS n FROM deliveries WHERE occurrence = $1"
            " GROUP BY 1, 2",
            occurrence,
        )
        by_outcome = {(r["status"], r["reason"]): r["n"] for r in outcomes}
        assert by_outcome.get(("missed", "grace_exceeded"), 0) >= 1, (details, seen)
        assert set(by_outcome) <= {("missed", "grace_exceeded"), ("sent", None)}, by_outcome
        assert sum(by_outcome.values()) == len(USERS), (details, [tuple(r) for r in seen])

    # --- opt one user out ---
    response = await daemon.api.post(
        f"/v1/users/{USERS[0]}/opt-out", json={"plan": "ticker", "reason": "asked to stop"}
    )
    assert response.status_code == 200
    opted = datetime.fromisoformat(response.json()["at"])
    await eventually(lambda: _full_after(store, opted, 1), 15, "an occurrence after the opt-out")
    assert (
        await count(
            store,
            "SELECT count(*) FROM deliveries WHERE user_id = $1 AND due_at > $2"
            " AND reason = 'opted_out'",
            USERS[0],
            opted,
        )
        >= 1
    )

    # --- cancel: nothing more ---
    bad = await daemon.api.post("/v1/plans/ticker/cancel", json={})
    assert bad.status_code == 422
    response = await daemon.api.post("/v1/plans/ticker/cancel", json={"reason": "replaced"})
    assert response.json()["state"] == "cancelled"
    await eventually(lambda: no_pending(store), 10, "the last sends answered")
    rows = await count(store, "SELECT count(*) FROM deliveries")
    await _sleep(4)
    assert await count(store, "SELECT count(*) FROM deliveries") == rows
    assert (
        await daemon.api.post("/v1/plans/ticker/pause", json={"reason": "x"})
    ).status_code == 409

    # --- status (CLI and API) and metrics agree with the ledger ---
    ledger = {
        (r["status"], r["reason"]): r["n"]
        for r in await store.pool.fetch(
            "SELECT status, reason, count(*) AS n FROM deliveries GROUP BY 1, 2"
        )
    }
    shown = daemon.cli("status", "ticker", "--json")
    assert shown.returncode == 0, shown.stderr
    report = json.loads(shown.stdout)
    assert report["state"] == "cancelled"
    assert {(o["outcome"], o["reason"]): o["all"] for o in report["outcomes"]} == ledger
    assert [r["id"] for r in report["replicas"] if r["alive"]] == ["ops-1"]
    api_report = (await daemon.api.get("/v1/plans/ticker")).json()
    assert api_report["outcomes"] == report["outcomes"]
    text = daemon.cli("status").stdout
    assert "ticker" in text and "cancelled" in text and "Replicas: 1 alive" in text

    metrics = (await daemon.api.get("/metrics")).text
    for (status, reason), n in ledger.items():
        label = f'reminders_sends_total{{outcome="{status}",plan="ticker",reason="{reason or ""}"}}'
        assert f"{label} {float(n)}" in metrics, (label, n)
    assert 'reminders_plans{state="cancelled"} 1.0' in metrics
    assert "reminders_fire_lag_seconds_count" in metrics

    trail = daemon.cli("audit", "--plan", "ticker").stdout
    for expected in ("pause", "resume", "cancel", "token:ops", "wrong text", "second look"):
        assert expected in trail
    await daemon.stop()
    assert daemon.proc.returncode == 0
    assert "Traceback" not in daemon.logged()


async def test_live_plan_files_add_edit_invalid_edit_delete_and_reload(store, running):
    folder: Path = running.folder
    daemon = running()
    await eventually(lambda: api_ready(daemon), 30, "the daemon's API")

    # A new file is validated and scheduled within seconds.
    (folder / "live.yaml").write_text(LIVE % "first text")
    await eventually(lambda: _plan_loaded(store, "live"), 10, "the new plan loaded")
    for user in ("o-a", "o-b"):
        await store.enroll("live", user, datetime.now(UTC), "Asia/Shanghai", {}, None)
        await store.record_consent(user, "tmpl_live", "long_term", "accept", "test")
    await eventually(lambda: _sent_version(store, 1), 10, "sends of version 1")

    # An edit is a new version for future occurrences; past rows keep theirs.
    (folder / "live.yaml").write_text(LIVE % "second text")
    await eventually(lambda: _sent_version(store, 2), 10, "sends of version 2")
    messages = {
        r["plan_version"]: r["message"]["thing1"]
        for r in await store.pool.fetch(
            "SELECT DISTINCT plan_version, message FROM deliveries WHERE status = 'sent'"
        )
    }
    assert messages == {1: "first text", 2: "second text"}

    # An invalid edit is rejected, shown in status and the log; version 2 keeps running.
    (folder / "live.yaml").write_text((LIVE % "third").replace("transport", "spaceflight"))
    await eventually(lambda: _problem(store), 10, "the invalid edit rejected")
    since = datetime.now(UTC)
    await eventually(lambda: _sent_version(store, 2, since), 10, "version 2 still sending")
    report = json.loads(daemon.cli("status", "live", "--json").stdout)
    assert report["version"] == 2 and report["state"] == "active"
    assert report["file_problems"][0]["problems"][0]["field"] == "category"
    assert "live.yaml: category:" in daemon.cli("status").stdout
    assert "plan file rejected" in daemon.logged()

    # Deleting the file pauses the plan, reason "file removed".
    (folder / "live.yaml").unlink()
    await eventually(lambda: _state(store, "live", "paused"), 10, "the plan paused")
    assert (await store.pool.fetchval("SELECT state_reason FROM plans")) == "file removed"
    report = json.loads(daemon.cli("status", "live", "--json").stdout)
    assert report["file_problems"] == []

    # SIGHUP and `reminders reload` force a rescan.
    daemon.proc.send_signal(signal.SIGHUP)
    await eventually(lambda: _logged(daemon, "rescanned (SIGHUP)"), 10, "a SIGHUP rescan")
    done = daemon.cli("reload")
    assert done.returncode == 0 and "1 live replica" in done.stdout, done.stdout + done.stderr
    await eventually(lambda: _logged(daemon, "rescanned (reload command)"), 10, "a reload")
    trail = daemon.cli("audit", "--plan", "live").stdout
    assert "file_rejected" in trail and "file removed" in trail
    await daemon.stop()
    assert daemon.proc.returncode == 0


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def _full_after(store: Store, after: datetime, n: int) -> bool:
    return await full_occurrences_after(store, after) >= n


async def _pending(store: Store) -> bool:
    return bool(await count(store, "SELECT count(*) FROM deliveries WHERE status = 'pending'"))


async def _sent_to_all(store: Store, occurrence: str) -> bool:
    return await count(
        store,
        "SELECT count(*) FROM deliveries WHERE occurrence = $1 AND status = 'sent'",
        occurrence,
    ) == len(USERS)


async def _plan_loaded(store: Store, plan_id: str) -> bool:
    return await store.plan(plan_id) is not None


async def _sent_version(store: Store, version: int, after: datetime | None = None) -> bool:
    return bool(
        await count(
            store,
            "SELECT count(*) FROM deliveries WHERE status = 'sent' AND plan_version = $1"
            " AND ($2::timestamptz IS NULL OR claimed_at > $2)",
            version,
            after,
        )
    )


async def _problem(store: Store) -> bool:
    return bool(await count(store, "SELECT count(*) FROM plan_problems"))


async def _state(store: Store, plan_id: str, state: str) -> bool:
    return (await store.plan(plan_id)).state == state


async def _logged(daemon: Running, text: str) -> bool:
    return text in daemon.logged()
