"""One owner per rule, checked: consent is decided in Python (`domain.consent`: `apply`, `allows`,
used by `preview`, `simulate`, the runway and the ingestion API) and again in SQL (the gate's
claim spends credits, a failed send refunds them, a 43101 ends them). On generated histories of
popups, settings switches and bans, and WeChat faults mid fan-out, the two must agree:

- before each occurrence, Python's `allows` over the user's recorded history predicts exactly
  which users the gate lets through and which it skips as `no_consent`;
- afterwards, the consent cache the SQL maintained equals Python's `derive` over the whole
  history, including the `consume` / `refund` / `exhausted` rows the SQL appended.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from scheduler.app.dispatcher import Dispatcher
from scheduler.domain.consent import ConsentEvent, ConsentState, Result, Via, derive
from scheduler.domain.plan import ConsentKind, Plan
from scheduler.store.consent import ConsentReport, ConsentStore
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, plan_of, register, reset_database

DAY1 = datetime(2026, 3, 2, 1, 0, tzinfo=UTC)  # 09:00 in Shanghai
OCCURRENCES = 3


def daily(plan_id: str, consent: ConsentKind) -> Plan:
    return plan_of(
        {
            "id": plan_id,
            "name": plan_id,
            "category": "government",
            "consent": consent.value,
            "schedule": {
                "calendar": {
                    "timezone": "Asia/Shanghai",
                    "daily": {"at": "09:00"},
                    "start": "2026-03-02",
                }
            },
            "template": {"id": f"t_{plan_id}", "fields": {"thing1": "thing"}},
            "message": {"default": {"thing1": "第{step}次提醒"}},
        }
    )


PLANS = [daily("once", ConsentKind.ONE_TIME), daily("always", ConsentKind.LONG_TERM)]

user_events = st.lists(
    st.tuples(
        st.sampled_from([Result.ACCEPT, Result.ACCEPT, Result.REJECT, Result.BAN, Result.FILTER]),
        st.sampled_from([Via.POPUP, Via.POPUP, Via.SETTINGS]),
        st.sampled_from([None, ConsentKind.ONE_TIME, ConsentKind.LONG_TERM]),
        st.sampled_from([p.template.id for p in PLANS]),
    ),
    max_size=6,
)
# WeChat's answers to the next sends, in order: 0 is a success; 43101 (the user's consent is
# gone: the SQL ends it) and 47003 (a bad field: not sent, the credit is refunded).
faults = st.lists(st.sampled_from([0, 0, 0, 43101, 47003]), max_size=12)


async def history(store, user_id: str, template_id: str) -> list[ConsentEvent]:
    rows = await store.pool.fetch(
        "SELECT result, via, kind, corroborates IS NOT NULL AS corroborates FROM consent_events"
        " WHERE user_id = $1 AND template_id = $2 ORDER BY id",
        user_id,
        template_id,
    )
    return [
        ConsentEvent(
            Result(r["result"]),
            Via(r["via"]),
            ConsentKind(r["kind"]) if r["kind"] else None,
            r["corroborates"],
        )
        for r in rows
    ]


async def cached(store, user_id: str, template_id: str) -> ConsentState:
    row = await store.pool.fetchrow(
        "SELECT credits, long_term, banned FROM consent WHERE user_id = $1 AND template_id = $2",
        user_id,
        template_id,
    )
    return ConsentState(**dict(row)) if row else ConsentState()


@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(users=st.lists(user_events, min_size=1, max_size=12), wechat=faults)
async def test_python_and_the_sql_gate_decide_consent_alike(store, fake, channel, users, wechat):
    await reset_database(store)
    fake.messages.clear()
    consent = ConsentStore(store.pool)
    ids = [f"o-user-{n:02d}" for n in range(len(users))]
    for plan in PLANS:
        await register(store, plan)
        for user_id in ids:
            await store.enroll(plan.id, user_id, DAY1, "Asia/Shanghai", {}, None)
    reports = [
        ConsentReport(user_id, template, result, "test", kind=kind, via=via)
        for user_id, events in zip(ids, users, strict=True)
        for result, via, kind, template in events
    ]
    if reports:
        await consent.record(reports)
    for code in wechat:  # queued in order: the n-th send gets the n-th answer
        fake.inject([code] if code else [])
    clock = Clock(DAY1)
    dispatch = Dispatcher(store, channel, replica_id="agree", clock=clock, concurrency=1)

    for day in range(OCCURRENCES):
        clock.now = fire = DAY1 + timedelta(days=day)
        for plan in PLANS:
            predicted = {
                user_id: derive(await history(store, user_id, plan.template.id)).allows(
                    plan.consent
                )
                for user_id in ids
            }
            await dispatch.fire(plan.id, fire)
            rows = await store.pool.fetch(
                "SELECT user_id, status, reason FROM deliveries WHERE plan_id = $1"
                " AND occurrence = $2",
                plan.id,
                fire.isoformat(),
            )
            gated = {r["user_id"]: r["reason"] != "no_consent" for r in rows}
            assert gated == predicted, f"{plan.id} on day {day + 1}: the gate and Python differ"

    for user_id in ids:
        for plan in PLANS:
            template = plan.template.id
            assert await cached(store, user_id, template) == derive(
                await history(store, user_id, template)
            ), f"{user_id}/{template}: the SQL's consent cache is not Python's derive"
