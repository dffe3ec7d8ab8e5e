"""The frequency caps under concurrency: several dispatchers in one process, then two daemon
processes on one database, all sending to users shared between plans. Together they never pass
a cap, and the gate's counters agree with what was sent."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from scheduler.app.dispatcher import Dispatcher
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.plan import Plan
from scheduler.domain.policy import Policy
from scheduler.planfiles import load_plan_file
from scheduler.store.postgres import Store
from tests.ops_helpers import fake_fixture, fake_url_fixture  # noqa: F401 - fixtures
from tests.support import Clock, DaemonProcess, fake_messages, wait_for

SHANGHAI = ZoneInfo("Asia/Shanghai")
FINAL = {"sent", "skipped", "failed", "missed", "unknown"}


# --- several dispatchers in one process, in virtual time ------------------------------------

FIRST_DAY = date(2026, 3, 2)  # a Monday
DAYS = 3
USERS = [f"o-{i:02d}" for i in range(60)]
ZONES = {u: "Asia/Tokyo" if i % 4 == 0 else "Asia/Shanghai" for i, u in enumerate(USERS)}
# Every user is in at least two plans, most in three; the default policy allows 2 a day.
AUDIENCES = {"gov": USERS[:48], "bus": USERS[12:], "school": USERS}


def daily_plan(plan_id: str, category: str, **delivery: str) -> Plan:
    return Plan.model_validate(
        {
            "id": plan_id,
            "name": plan_id.title(),
            "category": category,
            "consent": "long_term",
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": "10:00"},
                    "start": FIRST_DAY.isoformat(),
                    "count": DAYS,
                }
            },
            "template": {"id": f"tmpl_{plan_id}", "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": f"{plan_id} day {{step}}"}},
            "delivery": delivery,
        }
    )


PLANS = [
    daily_plan("gov", "government"),
    daily_plan("bus", "transport"),
    # A capped message of this plan waits for the next day (and its quiet hours) instead.
    daily_plan("school", "education", on_capped="defer", max_delay="1 day"),
]


async def test_four_dispatchers_at_once_never_pass_the_daily_cap(store: Store, fake):
    policy = Policy()
    assert policy.caps.user_day == 2
    for plan in PLANS:
        await store.register_plan(plan, "test")
        for user in AUDIENCES[plan.id]:
            start = datetime.combine(FIRST_DAY, time(), UTC)
            await store.enroll(plan.id, user, start, ZONES[user], {}, None)
            await store.record_consent(user, plan.template.id, "long_term", "accept", "test")
    clock = Clock(datetime.combine(FIRST_DAY, time(), UTC))
    channels = [
        WeChatChannel(base_url=fake.base_url, appid="app", secret="secret", retries=1)
        for _ in range(4)
    ]
    # Small batches, so the replicas' claims interleave on the same users' counters.
    dispatchers = [
        Dispatcher(
            store, ch, replica_id=f"r{n}", clock=clock, policy=policy, batch_size=5, concurrency=4
        )
        for n, ch in enumerate(channels)
    ]
    fires = [
        datetime.combine(FIRST_DAY + timedelta(days=n), time(10), SHANGHAI) for n in range(DAYS)
    ]
    try:
        for _ in range(4 * DAYS + 10):  # fires and retry rounds: bounded
            deferral = await store.pool.fetchval(
                "SELECT min(defer_until) FROM deliveries WHERE status = 'deferred'"
            )
            if deferral is None and not fires:
                break
            if deferral is not None and (not fires or deferral <= fires[0]):
                clock.now = deferral
                await asyncio.gather(*(d.retry_deferred(p.id) for d in dispatchers for p in PLANS))
            else:
                clock.now = fires.pop(0)
                # Every replica fires every plan's occurrence, all at once.
                await asyncio.gather(*(d.fire(p.id, clock.now) for d in dispatchers for p in PLANS))
        else:
            raise AssertionError("deferred sends did not settle")
    finally:
        for ch in channels:
            await ch.aclose()

    rows = await store.pool.fetch(
        "SELECT plan_id, occurrence, user_id, status, reason, claimed_by FROM deliveries"
    )
    # One row per (plan, occurrence, user), each with a final outcome.
    assert len(rows) == DAYS * sum(len(a) for a in AUDIENCES.values())
    assert {r["status"] for r in rows} <= FINAL
    assert len({r["claimed_by"] for r in rows}) > 1  # the replicas really shared the work
    # What WeChat received is what the ledger says was sent, and nothing twice.
    received = Counter((m["touser"], m["template_id"], m["data"]["thing1"]) for m in fake.messages)
    assert max(received.values()) == 1
    sent = Counter((r["user_id"], f"tmpl_{r['plan_id']}") for r in rows if r["status"] == "sent")
    assert Counter((u, t) for u, t, _ in received.elements()) == sent

    # The counters are the gate's truth: one per user and local day, never past the cap, and
    # equal to the messages sent that day.
    counters = await store.pool.fetch(
        "SELECT key, used FROM cap_counters WHERE key LIKE 'user-day:%' AND used > 0"
    )
    per_day = {r["key"]: r["used"] for r in counters}
    assert max(per_day.values()) <= policy.caps.user_day
    per_user = Counter()
    for key, used in per_day.items():
        per_user[key.split(":")[1]] += used
    assert per_user == Counter(u for u, _ in sent.elements())
    # Each of the three days every user had at least two messages due, so each got exactly two
    # (a deferred one may go the morning after the last day).
    for user in USERS:
        for n in range(DAYS):
            day = (FIRST_DAY + timedelta(days=n)).isoformat()
            assert per_day.get(f"user-day:{user}:{day}") == 2, (user, day)
    capped = Counter((r["status"], r["plan_id"]) for r in rows if r["reason"] == "capped")
    assert capped, "the cap was never reached: the test proves nothing"


# --- two daemon processes -----------------------------------------------------------------------

DAEMON_USERS = [f"o-user-{i}" for i in range(6)]
CAP = 5
OCCURRENCES = 5  # per plan: one plan alone stays within the cap (validate accepts it)
POLICY = f"""
caps:
  user_day: {CAP}
  category_week: {{medical: 1000, education: 1000}}
  category_week_default: 1000
quiet_hours:
  default: {{start: "00:00", end: "00:00"}}
  categories: {{transport: {{start: "00:00", end: "00:00"}}}}
"""
DAEMON_PLAN = """
id: {id}
name: {id}
category: {category}
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    every: 2 seconds
    start: "{start}"
    count: {count}
template:
  id: tmpl_{id}
  fields:
    thing1: thing
    number2: number
message:
  default:
    thing1: "{id} for {{user}}"
    number2: "{{step}}"
"""
DAEMON_PLANS = {"ticket": "transport", "permit": "government", "lesson": "education"}


def write_plans(folder: Path) -> None:
    folder.mkdir()
    (folder / "policy.yaml").write_text(POLICY)
    # Far enough ahead for both daemons to be up; whole seconds, so both see the same anchor.
    start = datetime.now(SHANGHAI).replace(microsecond=0, tzinfo=None) + timedelta(seconds=8)
    for plan_id, category in DAEMON_PLANS.items():
        (folder / f"{plan_id}.yaml").write_text(
            DAEMON_PLAN.format(
                id=plan_id, category=category, start=start.isoformat(), count=OCCURRENCES
            )
        )


async def test_two_daemons_sending_to_shared_users_never_pass_the_daily_cap(
    store: Store, db_url: str, fake_url: str, tmp_path: Path
):
    plans_dir = tmp_path / "plans"
    write_plans(plans_dir)
    for plan_id in DAEMON_PLANS:  # registered and enrolled as `reminders enroll` would
        item = load_plan_file(plans_dir / f"{plan_id}.yaml")
        await store.register_plan(item.plan, "test")
        for user in DAEMON_USERS:
            await store.enroll(plan_id, user, datetime.now(UTC), "Asia/Shanghai", {}, None)
            await store.record_consent(user, f"tmpl_{plan_id}", "long_term", "accept", "test")
    days = {datetime.now(SHANGHAI).date()}
    logs = {r: tmp_path / f"{r}.log" for r in ("r1", "r2")}
    daemons = {r: DaemonProcess(r, db_url, plans_dir, fake_url, log) for r, log in logs.items()}
    try:

        async def everyone_capped() -> bool:
            per_user = Counter(m["touser"] for m in await fake_messages(fake_url))
            return all(per_user[u] >= CAP for u in DAEMON_USERS)

        async def all_done() -> bool:
            return await store.pool.fetchval(
                "SELECT count(*) = $1 FROM plans WHERE state = 'completed'", len(DAEMON_PLANS)
            ) and not await store.pool.fetchval(
                "SELECT count(*) FROM deliveries WHERE status IN ('pending', 'deferred')"
            )

        await wait_for(everyone_capped, within_s=40, what=f"{CAP} messages for every user")
        await wait_for(all_done, within_s=20, what="every plan's occurrences fired")
        await asyncio.sleep(2)  # nothing more may arrive
        for replica, daemon in daemons.items():
            assert daemon.stop() == 0, logs[replica].read_text()
    finally:
        for daemon in daemons.values():
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait(10)
    days.add(datetime.now(SHANGHAI).date())
    for log in logs.values():
        assert "Traceback" not in log.read_text(), log.read_text()

    messages = await fake_messages(fake_url)
    received = Counter(m["touser"] for m in messages)
    # No message twice: each (user, plan, step) at most once.
    once = Counter((m["touser"], m["template_id"], m["data"]["number2"]) for m in messages)
    assert max(once.values()) == 1
    rows = await store.pool.fetch("SELECT user_id, status, reason FROM deliveries")
    assert {r["status"] for r in rows} <= FINAL
    sent = Counter(r["user_id"] for r in rows if r["status"] == "sent")
    assert sent == received
    capped = Counter(r["user_id"] for r in rows if r["reason"] == "capped")
    assert set(capped) == set(DAEMON_USERS), capped
    assert {r["status"] for r in rows if r["reason"] == "capped"} == {"skipped"}

    # Per user and local day (the gate's own counters) never more than the cap, and they add
    # up to what WeChat received.
    counters = await store.pool.fetch(
        "SELECT key, used FROM cap_counters WHERE key LIKE 'user-day:%' AND used > 0"
    )
    assert counters and max(r["used"] for r in counters) <= CAP
    per_user = Counter()
    for r in counters:
        per_user[r["key"].split(":")[1]] += r["used"]
    assert per_user == received
    if len(days) == 1:  # the usual case: the run did not cross a midnight in Shanghai
        assert received == {u: CAP for u in DAEMON_USERS}
    else:
        assert all(CAP <= n <= CAP * len(days) for n in received.values()), received
