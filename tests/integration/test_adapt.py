"""Adapt rules end to end (docs/plans.md#adapt): activity and opens reported through the real
API, a relative plan swept in virtual time through the real gate and PostgreSQL, sends to a fake
WeChat on loopback."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from scheduler import simulate
from scheduler.app.dispatcher import FanOutReport
from scheduler.app.lifecycle import Lifecycle
from scheduler.domain.plan import Plan
from scheduler.domain.policy import Policy
from scheduler.domain.schedule import relative_due
from scheduler.planfiles import load_plans
from scheduler.store.postgres import Store
from tests.ingest_helpers import INGEST, serve
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, dispatcher, register

START = datetime(2026, 3, 2, 2, 0, tzinfo=UTC)  # Monday 10:00 in Shanghai
STEP = [datetime(2026, 3, 9 + 7 * i, 1, 0, tzinfo=UTC) for i in range(4)]  # 09:00 local
TZ = ZoneInfo("Asia/Shanghai")
ENCOURAGEMENT = "{patient}，一周没见，坚持训练"


def adaptive_plan(**delivery: Any) -> Plan:
    return Plan.model_validate(
        {
            "id": "rehab",
            "name": "Rehab",
            "category": "medical",
            "consent": "one_time",
            "schedule": {
                "relative": {"every": "1 week", "count": 4, "at": "09:00"},
                "grace": "2 hours",
            },
            "template": {"id": "tmpl_rehab", "fields": {"thing1": "thing", "thing2": "thing"}},
            "message": {
                "default": {"thing1": "第{step}周康复训练", "thing2": "仅供参考"},
                "extra": {"encouragement": {"thing1": ENCOURAGEMENT}},
            },
            "variables": ["patient"],
            "adapt": [
                {"if": {"inactive_for": "7 days"}, "send": "encouragement"},
                {"if": {"active_within": "1 day"}, "skip": True},
            ],
            "delivery": delivery,
        }
    )


async def enrol(store: Store, plan: Plan, users: dict[str, int]) -> None:
    """Each user with their one-time credits."""
    assert plan.schedule.relative is not None
    for user, credits in users.items():
        due = relative_due(plan.schedule.relative, START, TZ, 0)
        await store.enroll(plan.id, user, START, TZ.key, {"patient": user}, due)
        for _ in range(credits):
            await store.record_consent(user, "tmpl_rehab", "one_time", "accept", "test")


async def activity(api, *items: tuple[str, datetime, str], status: int = 200) -> dict:
    body = {
        "activity": [
            {"openid": user, "at": at.isoformat(), "kind": "training", "event_id": event}
            for user, at, event in items
        ]
    }
    response = await api.post("/v1/activity", headers=INGEST, json=body)
    assert response.status_code == status, response.text
    return response.json()


async def opened(api, user: str, at: datetime) -> None:
    body = {"opens": [{"openid": user, "scene": 1014, "at": at.isoformat()}]}
    response = await api.post("/v1/opens", headers=INGEST, json=body)
    assert response.status_code == 200, response.text


async def rows(store: Store) -> list[tuple]:
    found = await store.pool.fetch(
        "SELECT user_id, occurrence, step, status, reason, detail, variant FROM deliveries"
        " ORDER BY user_id, due_at, occurrence"
    )
    return [tuple(r) for r in found]


async def sweep_at(d, clock: Clock, moment: datetime, times: int = 1) -> list[FanOutReport]:
    clock.now = moment + timedelta(minutes=1)
    return [await d.fire("rehab", clock.now) for _ in range(times)]


async def test_inactive_users_are_encouraged_once_per_period_and_active_ones_skip(
    store, fake, channel
):
    plan = adaptive_plan()
    await register(store, plan)
    await enrol(store, plan, {"o-busy": 9, "o-idle": 9, "o-new": 9})
    clock = Clock(START)
    d = dispatcher(store, channel, clock, batch_size=2)  # users span batches
    async with serve(store) as api:
        await activity(api, ("o-idle", datetime(2026, 3, 1, 12, 0, tzinfo=UTC), "a-1"))
        await opened(api, "o-busy", datetime(2026, 3, 8, 20, 0, tzinfo=UTC))

        first, double = await sweep_at(d, clock, STEP[0], times=2)
        second = await sweep_at(d, clock, STEP[1], times=2)
        await activity(api, ("o-idle", datetime(2026, 3, 20, 3, 0, tzinfo=UTC), "a-2"))
        await sweep_at(d, clock, STEP[2])
        await sweep_at(d, clock, STEP[3])

    assert first.outcomes == {
        "sent": 3,  # o-idle's step and encouragement, o-new's step
        "failed": 0,
        "already_claimed": 0,
        "missed": 0,
        "skipped:adapted": 1,  # o-busy
    }
    assert double.claimed == 0 and double.sent == 0  # nothing due any more
    # step 2: o-idle's encouragement of the same inactivity meets its row, and is not sent again
    assert (second[0].sent, second[0].already_claimed) == (4, 1)
    idle_since_1 = "extra:encouragement:since:2026-03-01T12:00:00+00:00"
    idle_since_20 = "extra:encouragement:since:2026-03-20T03:00:00+00:00"
    busy_since = "extra:encouragement:since:2026-03-08T20:00:00+00:00"
    skip_detail = (
        "adapt.1 (active_within 1 day: skip): last open 2026-03-08 20:00 UTC, last activity never"
    )
    sent = ("sent", None, None)
    encouraged = ("sent", None, None, "extra:encouragement")
    assert await rows(store) == [
        ("o-busy", "step-1", 1, "skipped", "adapted", skip_detail, None),
        # a week after that open: inactive, so encouraged (once), with the plan's own step
        ("o-busy", busy_since, 2, *encouraged),
        ("o-busy", "step-2", 2, *sent, None),
        ("o-busy", "step-3", 3, *sent, None),
        ("o-busy", "step-4", 4, *sent, None),
        ("o-idle", idle_since_1, 1, *encouraged),
        ("o-idle", "step-1", 1, *sent, None),
        ("o-idle", "step-2", 2, *sent, None),  # still the same inactivity: no second one
        ("o-idle", "step-3", 3, *sent, None),  # active 3 days before: the plain step
        ("o-idle", idle_since_20, 4, *encouraged),  # inactive again: a new period
        ("o-idle", "step-4", 4, *sent, None),
        *[("o-new", f"step-{n}", n, *sent, None) for n in range(1, 5)],  # no data: plain
    ]
    cards = [(m["touser"], m["data"]["thing1"]) for m in fake.messages]
    assert cards.count(("o-idle", "o-idle，一周没见，坚持训练")) == 2
    assert cards.count(("o-busy", "o-busy，一周没见，坚持训练")) == 1
    assert len(cards) == 3 + 4 + 3 + 4  # o-busy 3 steps + 1 extra, o-idle 4 + 2, o-new 4


async def test_caps_consent_and_opt_outs_still_stop_an_extra_step(store, fake, channel):
    plan = adaptive_plan(caps={"plan_day": 1})  # the plan's own step takes the day's one
    await register(store, plan)
    await enrol(store, plan, {"o-capped": 5, "o-one-credit": 1, "o-out": 5})
    await Lifecycle(store).opt_out("o-out", plan_id=None, actor="admin", reason="asked to")
    clock = Clock(START)
    d = dispatcher(store, channel, clock)
    async with serve(store) as api:
        long_ago = datetime(2026, 2, 20, 0, 0, tzinfo=UTC)
        await activity(
            api,
            ("o-capped", long_ago, "c-1"),
            ("o-one-credit", long_ago, "c-2"),
            ("o-out", long_ago, "c-3"),
        )
        await sweep_at(d, clock, STEP[0])
        await sweep_at(d, clock, STEP[1])

    since = "extra:encouragement:since:2026-02-20T00:00:00+00:00"
    found = {(r[0], r[1]): (r[3], r[4]) for r in await rows(store)}
    assert found == {
        ("o-capped", "step-1"): ("sent", None),
        ("o-capped", since): ("skipped", "capped"),  # one attempt per inactivity period
        ("o-capped", "step-2"): ("sent", None),
        ("o-one-credit", "step-1"): ("sent", None),
        ("o-one-credit", since): ("skipped", "no_consent"),
        ("o-one-credit", "step-2"): ("skipped", "no_consent"),
        ("o-out", "step-1"): ("skipped", "opted_out"),
        ("o-out", since): ("skipped", "opted_out"),
        ("o-out", "step-2"): ("skipped", "opted_out"),
    }
    assert [m["touser"] for m in fake.messages] == ["o-capped", "o-one-credit", "o-capped"]


async def test_activity_batches_are_stored_once(store):
    at = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    async with serve(store) as api:
        first = await activity(api, ("o-a", at, "e-1"), ("o-b", at, "e-2"), ("o-a", at, "e-1"))
        again = await activity(api, ("o-a", at, "e-1"), ("o-b", at, "e-2"))
    assert first == {"recorded": 2, "duplicates": 1}
    assert again == {"recorded": 0, "duplicates": 2}
    stored = await store.pool.fetch("SELECT source, event_id, user_id, kind FROM activity")
    assert sorted(tuple(r) for r in stored) == [
        ("api:crm", "e-1", "o-a", "training"),
        ("api:crm", "e-2", "o-b", "training"),
    ]
    seen = await store.activity.last_seen(None, ["o-a", "o-nobody"], at)
    assert list(seen) == ["o-a"] and seen["o-a"].last_activity == at
    # reports dated later than the moment judged do not count yet
    assert await store.activity.last_seen(None, ["o-a"], at - timedelta(seconds=1)) == {}


GOOD = {"openid": "o-a", "at": "2026-03-01T12:00:00+08:00", "event_id": "e-1"}


BAD = [
    ({"activity": [{**GOOD, "at": "2026-03-01T12:00:00"}]}, "body.activity.0.at"),
    ({"activity": [{**GOOD, "at": "1999-12-31T00:00:00Z"}]}, "body.activity.0.at"),
    ({"activity": [{**GOOD, "event_id": ""}]}, "body.activity.0.event_id"),
    (
        {"activity": [{k: v for k, v in GOOD.items() if k != "event_id"}]},
        "body.activity.0.event_id",
    ),
    ({"activity": [{**GOOD, "kind": "a\x00b"}]}, "body.activity.0.kind"),
    ({"activity": [{**GOOD, "kind": "k" * 65}]}, "body.activity.0.kind"),
    ({"activity": [{**GOOD, "openid": "not an openid"}]}, "body.activity.0.openid"),
    ({"activity": [{**GOOD, "extra": 1}]}, "body.activity.0.extra"),
    ({"activity": []}, "body.activity"),
    ({"activity": [GOOD] * 1001}, "body.activity"),
]


async def test_bad_activity_is_refused_naming_the_field(store):
    async with serve(store, max_body_bytes=1_048_576) as api:
        for body, field in BAD:
            response = await api.post("/v1/activity", headers=INGEST, json=body)
            assert response.status_code == 422, response.text
            named = {p["field"] for p in response.json()["error"]["problems"]}
            assert field in named, response.text
        unauthorized = await api.post("/v1/activity", json={"activity": [GOOD]})
    assert unauthorized.status_code == 401
    assert await store.pool.fetchval("SELECT count(*) FROM activity") == 0


REHAB_YAML = """\
id: rehab
name: Rehab
category: medical
consent: one_time
variables: [patient]
schedule:
  relative: {every: 1 week, count: 3, at: "09:00"}
template: {id: tmpl_rehab, fields: {thing1: thing, thing2: thing}}
message:
  default: {thing1: "第{step}周康复训练", thing2: "仅供参考，不构成诊断"}
  extra:
    encouragement: {thing1: "{patient}，坚持就是胜利"}
adapt:
  - if: {inactive_for: 7 days}
    send: encouragement
  - if: {active_within: 1 day}
    skip: true
"""


async def test_simulate_runs_the_rules_on_simulated_activity(db_url, tmp_path):
    (tmp_path / "rehab.yaml").write_text(REHAB_YAML, encoding="utf-8")
    loaded, problems = load_plans([tmp_path])
    assert problems == []
    plans = [item.plan for item in loaded]
    start = datetime(2026, 12, 7, tzinfo=TZ)  # a Monday
    end = start + timedelta(weeks=4)
    users = simulate.audience(
        plans,
        simulate.parse_consent(None, plans),
        users=3,
        tz=TZ.key,
        start=start,
        end=end,
        variables={"patient": "x"},
    )
    activity, patterns = simulate.simulated_activity("daily:1,once:1", users, start, end)
    report = await simulate.run(db_url, loaded, Policy(), users, start, end, activity=activity)

    assert patterns == {"o-sim-1": "daily", "o-sim-2": "once"}
    timelines = {
        user: [(line.step, line.extra, line.status, line.reason) for line in lines]
        for user, lines in report.timeline.items()
    }
    assert timelines == {
        "o-sim-1": [(n, None, "skipped", "adapted") for n in (1, 2, 3)],  # active every day
        "o-sim-2": [  # active on the first day only: encouraged once, 13.5 days later
            (1, None, "sent", None),
            (2, "encouragement", "sent", None),
            (2, None, "sent", None),
            # "every step covered" granted 3 credits: the encouragement took one of them
            (3, None, "skipped", "no_consent"),
        ],
        "o-sim-3": [(n, None, "sent", None) for n in (1, 2, 3)],  # nothing reported
    }
    with pytest.raises(simulate.SimulationError, match="write daily:N or once:N"):
        simulate.simulated_activity("weekly:1", users, start, end)


async def test_a_calendar_plan_adapts_each_users_step_of_an_occurrence(store, fake, channel):
    plan = Plan.model_validate(
        {
            "id": "tips",
            "name": "Tips",
            "category": "transport",
            "consent": "long_term",
            "schedule": {
                "calendar": {"timezone": TZ.key, "daily": {"at": "09:00"}, "start": "2026-03-01"}
            },
            "template": {"id": "tmpl_tips", "fields": {"thing1": "thing"}},
            "message": {
                "default": {"thing1": "Tip {step}"},
                "extra": {"nudge": {"thing1": "Miss you"}},
            },
            "adapt": [
                {"if": {"inactive_for": "2 days"}, "send": "nudge"},
                {"if": {"active_within": "1 day"}, "skip": True},
            ],
        }
    )
    await register(store, plan)
    for user in ("o-active", "o-away", "o-new"):
        await store.enroll(plan.id, user, START, TZ.key, {}, None)
        await store.record_consent(user, "tmpl_tips", "long_term", "accept", "test")
    clock = Clock(START)
    d = dispatcher(store, channel, clock, batch_size=2)
    async with serve(store) as api:
        await activity(
            api,
            ("o-active", datetime(2026, 3, 1, 20, 0, tzinfo=UTC), "t-1"),
            ("o-away", datetime(2026, 2, 25, 0, 0, tzinfo=UTC), "t-2"),
        )
    for day in (2, 3):  # steps 2 and 3, 09:00 in Shanghai
        clock.now = datetime(2026, 3, day, 1, 0, tzinfo=UTC)
        await d.fire(plan.id, clock.now)

    step_2, step_3 = "2026-03-02T01:00:00+00:00", "2026-03-03T01:00:00+00:00"
    away = "extra:nudge:since:2026-02-25T00:00:00+00:00"
    found = [(r[0], r[1], r[2], r[3], r[4]) for r in await rows(store)]
    assert found == [
        ("o-active", step_2, 2, "skipped", "adapted"),
        ("o-active", step_3, 3, "sent", None),  # 29 hours later: neither rule
        ("o-away", step_2, 2, "sent", None),
        ("o-away", away, 2, "sent", None),  # once for this absence, not at step 3 again
        ("o-away", step_3, 3, "sent", None),
        ("o-new", step_2, 2, "sent", None),
        ("o-new", step_3, 3, "sent", None),
    ]
    away_cards = sorted(m["data"]["thing1"] for m in fake.messages if m["touser"] == "o-away")
    assert away_cards == ["Miss you", "Tip 2", "Tip 3"]
