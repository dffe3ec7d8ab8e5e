"""The daemon as a separate process, driven like an operator would, against a fake WeChat
process on loopback and a real PostgreSQL: delivery, restarts, two replicas, a kill -9."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from scheduler.store.postgres import Store
from tests.ops_helpers import fake_url_fixture, permissive_policy_in  # noqa: F401 - a fixture
from tests.support import DaemonProcess, fake_messages, wait_for

PLAN = """
id: ticker
name: Ticker
category: transport
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    every: 2 seconds
template:
  id: tmpl_tick
  fields:
    thing1: thing
    number2: number
message:
  default:
    thing1: "Tick for {user}"
    number2: "{step}"
"""
USERS = [f"o-user-{i:02d}" for i in range(8)]


@pytest.fixture
def plans_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "plans"
    folder.mkdir()
    permissive_policy_in(folder)
    (folder / "ticker.yaml").write_text(PLAN)
    return folder


@pytest.fixture
async def audience(store: Store, plans_dir: Path, db_url: str) -> Store:
    """Register the plan (as `reminders enroll` would) and enrol users with long-term consent."""
    from scheduler.planfiles import load_plan_file

    item = load_plan_file(plans_dir / "ticker.yaml")
    await store.register_plan(item.plan, str(item.path))
    now = datetime.now(UTC)
    for user in USERS:
        await store.enroll("ticker", user, now, "Asia/Shanghai", {}, None)
        await store.record_consent(user, "tmpl_tick", "long_term", "accept", "test")
    return store


@pytest.fixture
def daemons(db_url: str, plans_dir: Path, fake_url: str, tmp_path: Path) -> Iterator:
    started: list[DaemonProcess] = []

    def start(replica: str, **settings: str) -> DaemonProcess:
        log = tmp_path / f"{replica}.log"
        daemon = DaemonProcess(replica, db_url, plans_dir, fake_url, log, settings)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


async def sent_occurrences(store: Store) -> int:
    return await store.pool.fetchval(
        "SELECT count(DISTINCT occurrence) FROM deliveries WHERE status = 'sent'"
    )


async def assert_exactly_once(store: Store, fake_url: str) -> list[dict]:
    """Every message the fake received matches one `sent` ledger row and no (user, step) twice."""
    messages = await fake_messages(fake_url)
    per_user_step = Counter((m["touser"], m["data"]["number2"]) for m in messages)
    assert per_user_step and max(per_user_step.values()) == 1, per_user_step.most_common(3)
    rows = await store.pool.fetch("SELECT user_id, step::text AS step, status FROM deliveries")
    sent = {(r["user_id"], r["step"]) for r in rows if r["status"] == "sent"}
    unknown = {(r["user_id"], r["step"]) for r in rows if r["status"] == "unknown"}
    # A send in flight at a kill may or may not have reached WeChat: it is `unknown`, never resent.
    assert sent <= set(per_user_step) <= sent | unknown
    # After every replica stopped, no row is held by one: a clean stop gives what it claimed and
    # did not send back to the pool (claimed by nobody), for the next replica to send.
    held = await store.pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE status = 'pending' AND claimed_by IS NOT NULL"
    )
    assert held == 0
    return messages


async def test_daemon_delivers_each_occurrence_once_and_a_restart_resends_nothing(
    audience, daemons, fake_url, tmp_path
):
    store = audience
    first = daemons("r1")
    await wait_for(lambda: _at_least(store, 3), what="three occurrences sent")
    assert first.stop() == 0, (tmp_path / "r1.log").read_text()
    before = await assert_exactly_once(store, fake_url)
    assert {m["touser"] for m in before} == set(USERS)
    assert all(m["data"]["thing1"] == f"Tick for {m['touser']}" for m in before)

    done = await sent_occurrences(store)
    second = daemons("r1")  # the same replica comes back
    await wait_for(lambda: _at_least(store, done + 2), what="two more occurrences after restart")
    assert second.stop() == 0
    after = await assert_exactly_once(store, fake_url)
    assert len(after) > len(before)
    assert "Traceback" not in (tmp_path / "r1.log").read_text()


async def test_two_daemons_on_one_database_never_send_a_duplicate(
    audience, daemons, fake_url, tmp_path
):
    store = audience
    one, two = daemons("r1"), daemons("r2")
    await wait_for(lambda: _at_least(store, 5), what="five occurrences sent by two replicas")
    for replica, daemon in (("r1", one), ("r2", two)):
        assert daemon.stop() == 0, (tmp_path / f"{replica}.log").read_text()
    messages = await assert_exactly_once(store, fake_url)
    assert len(messages) >= 5 * len(USERS)


async def test_the_send_rate_setting_paces_the_daemon(audience, daemons, fake_url):
    store = audience
    daemon = daemons("r1", REMINDERS_SEND_RATE="4")
    await wait_for(lambda: _at_least(store, 1), what="an occurrence sent")
    assert daemon.stop() == 0
    times = sorted(m["received_at"] for m in await fake_messages(fake_url))
    # 8 users would go in milliseconds; at 4 a second they spread out.
    assert len(times) >= len(USERS)
    assert (len(times) - 1) / (times[-1] - times[0]) <= 4 * 1.3


async def test_kill_9_mid_fan_out_leaves_unknown_rows_and_no_resend(audience, daemons, fake_url):
    store = audience
    async with httpx.AsyncClient() as client:  # the first fan-out's sends take a while
        await client.post(f"{fake_url}/fake/inject", json={"latency_s": 3.0, "times": len(USERS)})
    victim = daemons("r1")
    await wait_for(lambda: _any_on_the_wire(store), what="a send in flight")
    victim.stop(signal.SIGKILL)
    in_flight = await store.pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE status = 'pending'"
    )
    assert in_flight > 0

    survivor = daemons("r1")  # restarting with the same identity resolves its own rows
    await wait_for(lambda: _unknown(store), what="in-flight rows resolved")
    await wait_for(lambda: _at_least(store, 2), what="later occurrences sent after the restart")
    assert survivor.stop() == 0
    await assert_exactly_once(store, fake_url)
    unknown = await store.pool.fetchval(
        "SELECT count(*) FROM deliveries WHERE status = 'unknown' AND reason = 'crashed_in_flight'"
    )
    assert unknown > 0


async def test_downtime_past_the_grace_window_is_recorded_missed_not_dropped(
    audience, daemons, fake_url, plans_dir
):
    store = audience
    (plans_dir / "ticker.yaml").write_text(
        PLAN.replace("every: 2 seconds", "every: 2 seconds\n  grace: 1 second")
    )
    first = daemons("r1")
    await wait_for(lambda: _at_least(store, 2), what="two occurrences sent")
    assert first.stop() == 0
    await asyncio.sleep(6)  # down for three occurrences or so
    second = daemons("r1")
    await wait_for(lambda: _missed(store), what="the downtime's occurrences recorded missed")
    await wait_for(lambda: _at_least(store, 4), what="sending resumed")
    assert second.stop() == 0

    await assert_exactly_once(store, fake_url)
    rows = await store.pool.fetch(
        "SELECT step, array_agg(DISTINCT status) AS statuses, count(*) AS users"
        " FROM deliveries GROUP BY step ORDER BY step"
    )
    steps = [r["step"] for r in rows]
    # No gap: every occurrence from the first to the last has one final outcome per user.
    assert steps == list(range(steps[0], steps[-1] + 1))
    assert all(r["users"] == len(USERS) and len(r["statuses"]) == 1 for r in rows)
    assert {s for r in rows for s in r["statuses"]} == {"sent", "missed"}


async def _missed(store: Store) -> bool:
    return bool(
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'missed'")
    )


async def _at_least(store: Store, occurrences: int) -> bool:
    complete = await store.pool.fetchval(
        "SELECT count(*) FROM (SELECT occurrence FROM deliveries GROUP BY occurrence"
        " HAVING count(*) FILTER (WHERE status = 'sent') = $1) AS done",
        len(USERS),
    )
    return complete >= occurrences


async def _any_on_the_wire(store: Store) -> bool:
    """A send authorized in the flight recorder (claimed rows not yet authorized are released
    by a restart and sent then, so a kill before this point leaves no `unknown`)."""
    return bool(
        await store.pool.fetchval("SELECT count(*) FROM replicas WHERE cardinality(in_flight) > 0")
    )


async def _unknown(store: Store) -> bool:
    return bool(
        await store.pool.fetchval("SELECT count(*) FROM deliveries WHERE status = 'unknown'")
    )
