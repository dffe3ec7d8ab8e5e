"""The gate's claim on a real PostgreSQL: rule stops, atomic frequency caps, deferrals."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from scheduler.domain.plan_state import PlanState
from scheduler.store.postgres import CapUse, Claim, ClaimBatch, Due, Stop, Store
from tests.support import calendar_plan, register, weekly_relative

DUE = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)
MIDNIGHT = datetime(2026, 3, 2, 16, 0, tzinfo=UTC)  # the next local day in Shanghai


Caps = list[tuple[int, CapUse]]  # (the row's position in the batch, a counter it counts)


async def claim_v2(
    store: Store,
    plan,  # noqa: ANN001
    occurrence: str,
    users: list[str],
    *,
    stops: list[Stop | None] | None = None,
    caps: Caps = (),
    on_capped: str = "skip",
    max_delay: timedelta = timedelta(0),
) -> list[Claim]:
    batch = ClaimBatch(plan.id, 1, plan.template.id, plan.consent.value, "r1", on_capped, max_delay)
    dues = [
        Due(
            occurrence,
            user,
            1,
            DUE,
            {"thing1": "x"},
            stops[i] if stops else None,
            tuple(c for row, c in caps if row == i),
        )
        for i, user in enumerate(users)
    ]
    return await store.claim(store.pool, batch, dues)


async def claim_v1(
    store: Store,
    plan,  # noqa: ANN001
    occurrence: str,
    users: list[str],
    *,
    stops: list[Stop | None] | None = None,
    caps: Caps = (),
    on_capped: str = "skip",
    max_delay: timedelta = timedelta(0),
) -> list[Claim]:
    """The previous release's call (claim_deliveries of migration 004, twenty parallel arrays),
    as its replicas still make it during a rolling upgrade."""
    stops = stops or []
    async with store.pool.acquire() as conn, conn.transaction():
        found = await conn.fetch(
            "SELECT delivery_id, user_id, status, reason FROM claim_deliveries("
            "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10,"
            " $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)",
            plan.id,
            1,
            plan.template.id,
            plan.consent.value,
            "r1",
            [occurrence] * len(users),
            users,
            [1] * len(users),
            [DUE] * len(users),
            [{"thing1": "x"}] * len(users),
            [s and s.status for s in stops],
            [s and s.reason for s in stops],
            [s and s.detail for s in stops],
            [s and s.defer_until for s in stops],
            [row + 1 for row, _ in caps],  # SQL arrays count from 1
            [c.key for _, c in caps],
            [c.limit for _, c in caps],
            [c.resets_at for _, c in caps],
            on_capped,
            max_delay,
        )
    return [Claim(*r) for r in found]


@pytest.fixture(params=[claim_v2, claim_v1], ids=["v2", "previous release"])
def claim(request: pytest.FixtureRequest):  # noqa: ANN201
    """Every test runs against the current claim and the previous release's: after migration
    008 both work on the same tables and give the same outcomes."""
    return request.param


def at(row: int, key: str, limit: int, resets_at: datetime) -> tuple[int, CapUse]:
    return row, CapUse(key, limit, resets_at)


def day_cap(users: list[str], limit: int) -> Caps:
    return [at(i, f"user-day:{u}:2026-03-02", limit, MIDNIGHT) for i, u in enumerate(users)]


async def rows(store: Store) -> dict[tuple[str, str], tuple]:
    found = await store.pool.fetch(
        "SELECT occurrence, user_id, status, reason, detail, defer_until FROM deliveries"
    )
    return {
        (r["occurrence"], r["user_id"]): (r["status"], r["reason"], r["detail"], r["defer_until"])
        for r in found
    }


async def credits(store: Store, user: str, template: str) -> int:
    return await store.pool.fetchval(
        "SELECT credits FROM consent WHERE user_id = $1 AND template_id = $2", user, template
    )


async def long_term_plan_with(store: Store, users: list[str]):  # noqa: ANN201
    plan = calendar_plan()
    await register(store, plan)
    for user in users:
        await store.record_consent(user, plan.template.id, "long_term", "accept", "test")
    return plan


async def test_a_full_cap_skips_the_send_and_says_until_when(store: Store, claim):
    plan = await long_term_plan_with(store, ["o-a", "o-b"])
    for occurrence in ("occ-1", "occ-2"):
        claims = await claim(store, plan, occurrence, ["o-a"], caps=day_cap(["o-a"], 2))
        assert [c.allowed for c in claims] == [True]
    claims = await claim(store, plan, "occ-3", ["o-a", "o-b"], caps=day_cap(["o-a", "o-b"], 2))

    assert sorted((c.user_id, c.allowed) for c in claims) == [("o-a", False), ("o-b", True)]
    status, reason, detail, _ = (await rows(store))[("occ-3", "o-a")]
    assert (status, reason) == ("skipped", "capped")
    assert "2026-03-02 16:00 UTC" in detail
    used = await store.pool.fetch("SELECT key, used FROM cap_counters ORDER BY key")
    assert [(r["key"], r["used"]) for r in used] == [
        ("user-day:o-a:2026-03-02", 2),
        ("user-day:o-b:2026-03-02", 1),
    ]


async def test_a_send_goes_only_if_every_counter_has_room(store: Store, claim):
    plan = await long_term_plan_with(store, ["o-a"])
    week = at(0, "user-category-week:o-a:transport:2026-W10", 1, MIDNIGHT + timedelta(days=6))
    assert [c.allowed for c in await claim(store, plan, "occ-1", ["o-a"], caps=[week])] == [True]

    claims = await claim(store, plan, "occ-2", ["o-a"], caps=[*day_cap(["o-a"], 5), week])

    assert [c.allowed for c in claims] == [False]
    # The day counter a refused send would have used is not counted.
    day_used = "SELECT used FROM cap_counters WHERE key LIKE 'user-day%'"
    assert await store.pool.fetchval(day_used) == 0


async def test_concurrent_claims_of_different_plans_never_exceed_a_shared_cap(store: Store, claim):
    """Twelve plans with their own templates (so no consent row is shared) send to the same
    users at once; the user-day counter is the only thing they share."""
    users = [f"o-{i:03d}" for i in range(100)]
    base = calendar_plan()
    plans = []
    for n in range(12):
        template = base.template.model_copy(update={"id": f"tmpl-{n}"})
        plan = base.model_copy(update={"id": f"alerts-{n}", "template": template})
        await register(store, plan)
        for user in users:
            await store.record_consent(user, template.id, "long_term", "accept", "test")
        plans.append(plan)

    results = await asyncio.gather(
        *(claim(store, plan, "occ", users, caps=day_cap(users, 3)) for plan in plans)
    )

    allowed = [c.user_id for claims in results for c in claims if c.allowed]
    assert {u: allowed.count(u) for u in users} == {u: 3 for u in users}
    statuses = await store.pool.fetch(
        "SELECT status, reason, count(*) AS n FROM deliveries GROUP BY 1, 2 ORDER BY 1"
    )
    assert [(r["status"], r["reason"], r["n"]) for r in statuses] == [
        ("pending", None, 300),
        ("skipped", "capped", 900),
    ]


async def test_a_capped_send_defers_to_the_reset_within_max_delay_then_goes(store: Store, claim):
    plan = await long_term_plan_with(store, ["o-a"])
    await claim(store, plan, "occ-1", ["o-a"], caps=day_cap(["o-a"], 1))
    gate = {"on_capped": "defer", "max_delay": timedelta(hours=16)}

    [held] = await claim(store, plan, "occ-2", ["o-a"], caps=day_cap(["o-a"], 1), **gate)
    assert not held.allowed
    assert (await rows(store))[("occ-2", "o-a")][::3] == ("deferred", MIDNIGHT)

    # At the reset the same row is claimed again, against the next day's counter.
    next_day = [at(0, "user-day:o-a:2026-03-03", 1, MIDNIGHT + timedelta(days=1))]
    [again] = await claim(store, plan, "occ-2", ["o-a"], caps=next_day, **gate)
    assert (again.delivery_id, again.allowed) == (held.delivery_id, True)
    assert (await rows(store))[("occ-2", "o-a")][:2] == ("pending", None)

    # A reset beyond max_delay is a skip.
    [late] = await claim(
        store, plan, "occ-3", ["o-a"], caps=next_day, on_capped="defer", max_delay=timedelta(0)
    )
    assert not late.allowed
    assert (await rows(store))[("occ-3", "o-a")][:2] == ("skipped", "capped")


async def test_a_row_already_sent_is_never_claimed_again(store: Store, claim):
    plan = await long_term_plan_with(store, ["o-a"])
    [first] = await claim(store, plan, "occ-1", ["o-a"])
    assert first.allowed
    assert await claim(store, plan, "occ-1", ["o-a"]) == []


async def test_rule_stops_are_recorded_and_take_no_one_time_credit(store: Store, claim):
    plan = weekly_relative()
    await register(store, plan)
    users = ["o-content", "o-quiet", "o-go"]
    for user in users:
        await store.record_consent(user, plan.template.id, "one_time", "accept", "test")
    quiet_until = DUE + timedelta(hours=3)
    stops = [
        Stop("skipped", "content", "thing1 contains the promotional word '优惠'"),
        Stop("deferred", "quiet_hours", "inside quiet hours 22:00-08:00", quiet_until),
        None,
    ]

    claims = await claim(store, plan, "step-1", users, stops=stops)

    assert sorted((c.user_id, c.status, c.reason) for c in claims) == [
        ("o-content", "skipped", "content"),
        ("o-go", "pending", None),
        ("o-quiet", "deferred", "quiet_hours"),
    ]
    ledger = await rows(store)
    assert ledger[("step-1", "o-content")][:3] == (
        "skipped",
        "content",
        "thing1 contains the promotional word '优惠'",
    )
    assert ledger[("step-1", "o-quiet")][::3] == ("deferred", quiet_until)
    assert [await credits(store, u, plan.template.id) for u in users] == [1, 1, 0]

    # The deferred send goes at the window's opening and only then takes its credit.
    [later] = await claim(store, plan, "step-1", ["o-quiet"])
    assert later.allowed and await credits(store, "o-quiet", plan.template.id) == 0


async def test_no_consent_comes_before_the_rules(store: Store, claim):
    plan = weekly_relative()
    await register(store, plan)
    stop = Stop("deferred", "quiet_hours", "quiet", DUE + timedelta(hours=1))

    [c] = await claim(store, plan, "step-1", ["o-none"], stops=[stop], caps=day_cap(["o-none"], 1))

    assert not c.allowed
    assert (await rows(store))[("step-1", "o-none")][:2] == ("skipped", "no_consent")
    assert await store.pool.fetchval("SELECT count(*) FROM cap_counters") == 0


async def test_counters_of_windows_long_past_are_pruned(store: Store, claim):
    plan = await long_term_plan_with(store, ["o-a"])
    await claim(store, plan, "occ-1", ["o-a"], caps=day_cap(["o-a"], 2))  # resets at MIDNIGHT
    week = at(0, "user-category-week:o-a:transport:2026-W10", 3, MIDNIGHT + timedelta(days=6))
    await claim(store, plan, "occ-2", ["o-a"], caps=[week])

    assert await store.prune_cap_counters(MIDNIGHT + timedelta(hours=23)) == 0  # not a day yet
    assert await store.prune_cap_counters(MIDNIGHT + timedelta(days=2)) == 1
    keys = await store.pool.fetch("SELECT key FROM cap_counters")
    assert [r["key"] for r in keys] == ["user-category-week:o-a:transport:2026-W10"]


@pytest.mark.parametrize("state", list(PlanState))
async def test_the_claim_sends_in_exactly_the_states_the_domain_says(store: Store, claim, state):
    plan = await long_term_plan_with(store, ["o-a"])
    await store.pool.execute("UPDATE plans SET state = $2 WHERE id = $1", plan.id, state.value)

    claims = await claim(store, plan, "occ-1", ["o-a"])

    assert [c.allowed for c in claims] == ([True] if state.sends else [])
