"""The engagement guard (docs/engagement.md, "The guard") in virtual days through the real
dispatcher and gate, a fake WeChat on loopback and the real consent history (`ConsentStore.record`,
the path of the API and WeChat's callback): an injected spike of cancellations after one step
pauses the plan (reason with the figures, audit row, metric, status lines), the same rate under
the minimum sends does not, noise at the baseline does not, an admin's resume is not undone by
the same old cancellations, and a step whose click-through is under the floor is flagged."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import yaml
from prometheus_client import REGISTRY

from scheduler.api.app import create_app
from scheduler.api.server import ApiServer
from scheduler.app import engagement
from scheduler.app.daemon import Daemon
from scheduler.app.engagement_guard import ACTOR, EngagementGuard
from scheduler.app.lifecycle import Lifecycle
from scheduler.app.status import overview, plan_status, render_overview, render_plan
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.consent import Result, Via
from scheduler.domain.plan import ConsentKind
from scheduler.domain.policy import Policy
from scheduler.settings import Settings
from scheduler.store.consent import ConsentReport, OpenReport
from scheduler.store.postgres import Store
from scheduler.testing.fake_wechat import FakeWeChat
from tests.ingest_helpers import ADMIN_ONLY, settings
from tests.ops_helpers import channel_fixture, consent_checking_fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, dispatcher, plan_of, register, wait_for

TEMPLATE = "tmpl_guard"
PLAN = plan_of(
    {
        "id": "guarded",
        "name": "Guarded tips",
        "category": "transport",
        "consent": "long_term",
        "schedule": {
            "calendar": {
                "timezone": "Asia/Shanghai",
                "daily": {"at": "09:00"},
                "start": "2026-03-01",
            },
            "grace": "1 hour",
        },
        "template": {"id": TEMPLATE, "fields": {"thing1": "thing"}, "page": "pages/tips/index"},
        "message": {"default": {"thing1": "Tip {step}"}},
    }
)
USERS = [f"oGuard{i:02d}" for i in range(40)]


def at(day: int, hour: int = 1) -> datetime:
    """March `day`, 2026, UTC: 01:00 UTC is 09:00 in Shanghai, when step `day` fires."""
    return datetime(2026, 3, day, hour, tzinfo=UTC)


def policy(**thresholds: Any) -> Policy:
    """The default policy with this plan's guard thresholds overridden (a per-plan exception)."""
    return Policy.model_validate(
        {"exceptions": {PLAN.id: {"reason": "a 40-user test cohort", "engagement": thresholds}}}
    )


# A 40-user cohort's thresholds; the limit out of the way, so that the spike rule decides.
SPIKE_ONLY = policy(min_sends=30, baseline_min_sends=60, max_cancellation_rate=0.5)


class World:
    """The plan, its 40 users, a dispatcher and the guard, on one virtual clock."""

    def __init__(self, store: Store, fake: FakeWeChat, channel: WeChatChannel, rules: Policy):
        self.store, self.fake, self.rules = store, fake, rules
        self.clock = Clock(at(2))
        self.lifecycle = Lifecycle(store, clock=self.clock)
        self.dispatcher = dispatcher(store, channel, self.clock, concurrency=8)
        self.guard = EngagementGuard(store, self.lifecycle, policy=lambda: self.rules)
        self.deliveries: dict[tuple[int, str], int] = {}  # (day, user) -> delivery id

    async def start(self, users: list[str] = USERS) -> None:
        await register(self.store, PLAN)
        for user in users:
            await self.store.enroll(PLAN.id, user, at(1), "Asia/Shanghai", {}, None)
            await self.store.record_consent(user, TEMPLATE, "long_term", "accept", "test")
            self.fake.grant(user, TEMPLATE, "long_term")

    async def fire(self, day: int) -> list[str]:
        """Step `day`, fired on March `day`; who got it."""
        before = len(self.fake.messages)
        self.clock.now = at(day, 1) + timedelta(minutes=1)  # the fire starts a minute late
        await self.dispatcher.fire(PLAN.id, at(day))
        got = []
        for m in self.fake.messages[before:]:
            rmd = int(parse_qs(urlsplit(m["page"]).query)["rmd"][0])
            self.deliveries[day, m["touser"]] = rmd
            got.append(m["touser"])
        return got

    async def cancel(self, users: list[str], when: datetime) -> None:
        """These users switch the template off in WeChat's settings at `when`."""
        await self.store.consent.record(
            [
                ConsentReport(
                    user,
                    TEMPLATE,
                    Result.REJECT,
                    "wechat:callback",
                    kind=ConsentKind.LONG_TERM,
                    via=Via.SETTINGS,
                    occurred_at=when,
                )
                for user in users
            ]
        )
        for user in users:
            self.fake.revoke(user, TEMPLATE)

    async def days_with_noise(self) -> None:
        """March 2-5: every day one recipient cancels four hours after the message (the
        baseline: 4 of 154 sends, 2.6 %)."""
        for day in range(2, 6):
            got = await self.fire(day)
            await self.cancel(got[:1], at(day, 5))

    async def check(self, hour_of: datetime) -> list[Any]:
        self.clock.now = hour_of
        return await self.guard.check()

    async def state(self) -> str:
        return (await self.store.status.plan(PLAN.id))["state"]


def pauses(rule: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "reminders_engagement_pauses_total", {"plan": PLAN.id, "rule": rule}
        )
        or 0.0
    )


async def test_a_spike_after_one_step_pauses_the_plan_and_a_resume_is_not_undone(
    store, fake, channel, tmp_path
):
    world = World(store, fake, channel, SPIKE_ONLY)
    await world.start()
    await world.days_with_noise()
    assert await world.check(at(5, 12)) == []  # 1 of 37 in the last 24 h: the baseline's noise

    # Step 6 goes off-topic: 10 of its 36 recipients switch the template off within hours.
    got = await world.fire(6)
    assert len(got) == 36
    await world.cancel(got[:10], at(6, 3))

    # The daemon's guard loop (every sweep period, one replica at a time) pauses the plan.
    before = pauses("spike")
    daemon = Daemon(
        Settings(sweep_seconds=0.05), store, channel, None, replica_id="t", clock=world.clock
    )
    daemon.dispatcher.policy = SPIKE_ONLY
    world.clock.now = at(6, 4)
    loop = asyncio.create_task(daemon.guard_forever())
    try:
        await wait_for(lambda: _is_paused(store), within_s=10, what="the automatic pause")
    finally:
        loop.cancel()
    assert pauses("spike") == before + 1

    row = await store.status.plan(PLAN.id)
    reason = row["state_reason"]
    assert reason == (
        "engagement guard: cancellations 27.8 % of 36 sends in 24 hours, baseline 2.6 % of 154 "
        "sends in the 7 days before: a spike (at least 3x the baseline and +2.0 %); most after "
        "step 6 (version 1): 10 of 36 (27.8 %). Check the content, then resume the plan"
    )
    [audit, *_] = await world.lifecycle.audit(plan_id=PLAN.id)
    assert (audit["action"], audit["actor"], audit["reason"]) == ("pause", ACTOR, reason)
    details = audit["details"]
    assert (details["rule"], details["sent"], details["cancelled"]) == ("spike", 36, 10)
    assert (details["baseline_sent"], details["baseline_cancelled"]) == (154, 4)
    assert details["judged_to"] == at(6, 4).isoformat()

    # Visible in `reminders status` (the overview and the plan) and the admin API's JSON.
    world.clock.now = at(6, 5)
    summary = await overview(store, now=world.clock.now)
    [line] = summary["plans"]
    assert (line["state"], line["paused_by"]) == ("paused", ACTOR)
    text = render_overview(summary)
    assert "PAUSED BY THE ENGAGEMENT GUARD: reminders resume guarded" in text
    assert "cancellations 27.8 % of 36 sends" in text
    status = await plan_status(
        store, PLAN.id, now=world.clock.now, guard=SPIKE_ONLY.guard_for(PLAN.id)
    )
    assert status["guard"]["paused"]["by"] == ACTOR
    # What the pause judged is left out of the guard's view from then on.
    assert status["guard"]["verdict"]["figures"] == "no sends in 24 hours"
    shown = render_plan(status)
    assert "by engagement" in shown
    assert "guard       PAUSED this plan at 2026-03-06 04:00 UTC" in shown
    assert "guard       since then: no sends in 24 hours (nothing to judge)" in shown
    assert "pauses over 50.0 %, or at 3x the baseline and +2.0 %, from 30 sends" in shown

    # The admin API, with the thresholds from the plans folder's policy.yaml.
    (tmp_path / "policy.yaml").write_text(
        yaml.safe_dump({"exceptions": SPIKE_ONLY.model_dump(mode="json")["exceptions"]})
    )
    app = create_app(settings(plans_dir=tmp_path), store, lifecycle=world.lifecycle)
    server = ApiServer(app, "127.0.0.1", 0)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as api:
            listed = (await api.get("/v1/plans", headers=ADMIN_ONLY)).json()
            one = (await api.get(f"/v1/plans/{PLAN.id}", headers=ADMIN_ONLY)).json()
    finally:
        await server.stop()
    assert [(p["id"], p["paused_by"], p["state_reason"]) for p in listed["plans"]] == [
        (PLAN.id, ACTOR, reason)
    ]
    assert one["guard"]["paused"]["by"] == ACTOR
    assert one["guard"]["thresholds"]["min_sends"] == 30  # the plan's exception

    # An admin resumes it: the same old cancellations (and late ones for step 6) do not pause it
    # again, though step 6 is still within the last 24 hours.
    await world.lifecycle.resume(PLAN.id, actor="admin", reason="step 6 rewritten")
    await world.cancel(got[10:12], at(6, 7))  # late reactions to the old step 6
    assert await world.check(at(6, 8)) == []
    assert await world.state() == "active"
    # The next day's step goes to the 24 still subscribed; their one cancellation is noise.
    got = await world.fire(7)
    assert len(got) == 24
    await world.cancel(got[:1], at(7, 3))
    assert await world.check(at(7, 4)) == []
    assert await world.state() == "active"
    assert pauses("spike") == before + 1


async def _is_paused(store: Store) -> bool:
    return (await store.status.plan(PLAN.id))["state"] == "paused"


async def test_noise_at_the_baseline_does_not_pause(store, fake, channel):
    world = World(store, fake, channel, SPIKE_ONLY)
    await world.start()
    await world.days_with_noise()
    got = await world.fire(6)
    await world.cancel(got[:1], at(6, 3))  # 2.8 % against 2.6 %: judged (36 sends), no spike
    assert await world.check(at(6, 4)) == []
    assert await world.state() == "active"
    status = await plan_status(
        store, PLAN.id, now=world.clock.now, guard=SPIKE_ONLY.guard_for(PLAN.id)
    )
    verdict = status["guard"]["verdict"]
    assert (verdict["pause"], verdict["recent"]["sent"], verdict["recent"]["cancelled"]) == (
        False,
        36,
        1,
    )
    assert "guard       ok: cancellations 2.8 % of 36 sends in 24 hours" in render_plan(status)


async def test_the_same_rate_under_the_minimum_sends_does_not_pause(store, fake, channel):
    users = USERS[:20]
    world = World(store, fake, channel, policy(min_sends=30))  # the default 5 % limit
    await world.start(users)
    got = await world.fire(2)
    await world.cancel(got[:5], at(2, 3))  # 25 % of 20 sends: far over the limit, too few
    assert await world.check(at(2, 4)) == []
    assert await world.state() == "active"
    status = await plan_status(store, PLAN.id, now=at(2, 4), guard=world.rules.guard_for(PLAN.id))
    assert status["guard"]["verdict"]["note"] == "not judged under 30 sends"

    # With a minimum of 20 the same figures pause it, over the limit (no baseline needed).
    world.rules = policy(min_sends=20)
    [paused] = await world.check(at(2, 4))
    assert paused.actor == ACTOR and paused.details["rule"] == "limit"
    assert paused.reason.startswith(
        "engagement guard: cancellations 25.0 % of 20 sends in 24 hours, no baseline "
        "(0 sends in the 7 days before): over the 5.0 % limit"
    )
    # A plan whose policy turns the automatic pause off is only watched.
    await world.lifecycle.resume(PLAN.id, actor="admin")
    world.rules = policy(min_sends=20, auto_pause=False)
    assert await world.check(at(2, 5)) == []


async def test_a_click_through_under_the_floor_flags_the_step(store, fake, channel):
    rules = policy(click_through_min_sends=30)  # the default floor, 5 %
    world = World(store, fake, channel, rules)
    await world.start()
    opened = []
    for day, readers in ((2, 20), (3, 1)):  # step 2: 50 %; step 3: 2.5 %
        got = await world.fire(day)
        opened += [
            OpenReport(u, 1014, at(day, 2), world.deliveries[day, u], "test") for u in got[:readers]
        ]
    await store.consent.record_opens(opened)
    now = at(3, 12)
    guard = rules.guard_for(PLAN.id)

    report = await engagement.report(store, PLAN.id, now=now, guard=guard)
    assert [(r["step"], r["click_through"], r["low_click_through"]) for r in report["rows"]] == [
        (2, 0.5, False),
        (3, 0.025, True),
    ]
    table = engagement.render(report, "table").splitlines()
    assert table[2].split()[5] == "50.0%" and table[3].split()[-2:] == ["low", "CTR"]
    assert table[-1] == (
        "low CTR: click-through under 5.0% from 30 sends (policy engagement.min_click_through)"
    )
    assert engagement.render(report, "csv").splitlines()[0].endswith(",low_click_through")
    status = await plan_status(store, PLAN.id, now=now, guard=guard)
    [step3] = [line for line in render_plan(status).splitlines() if "v1 step 3" in line]
    assert step3.endswith("low CTR: under 5.0% from 30 sends")
    assert await world.check(now) == [] and await world.state() == "active"  # a flag, no pause
