"""Property: random plans, users and schedules, fired in virtual time through the real dispatcher,
the gate's claim on PostgreSQL and a fake WeChat on loopback, never exceed any frequency cap and
never send in quiet hours; every ledger row ends with one final outcome.

The counts are made here, independently of the gate: each message is dated by the virtual clock
when it was handed to the channel, and its windows are the user's local calendar day, ISO week
and month. A counter shared by plans with different limits (user_day, a category's week) is
checked the way the gate checks it: the n-th message on it may go only if n is within the limit
of the plan that sends it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from scheduler.app.dispatcher import Dispatcher
from scheduler.channels.base import OutgoingMessage, SendResult
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.outcomes import Outcome
from scheduler.domain.plan import Category, Plan
from scheduler.domain.policy import Policy
from scheduler.domain.rules import Limits, dry_run, plan_limits
from scheduler.domain.schedule import Occurrence, calendar_anchor, calendar_occurrences
from scheduler.store.postgres import Store
from scheduler.testing.fake_wechat import FakeWeChat
from tests.ops_helpers import channel_fixture, fake_fixture  # noqa: F401 - fixtures
from tests.support import Clock, reset_database

ZONES = ("America/New_York", "Asia/Shanghai", "Europe/London", "Pacific/Auckland", "Asia/Kolkata")
CATEGORIES = (
    Category.GOVERNMENT,
    Category.MEDICAL,
    Category.TRANSPORT,
    Category.EDUCATION,
    Category.FINANCE,
)
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
REFS = ("A", "B")  # each enrolment's `ref`: finance counts its sends per value (limit_key)
FINAL = {"sent", "skipped", "failed", "missed", "unknown"}
MAX_EVENTS = 3_000  # fires and retry rounds in one example: a bound, never reached


# --- what hypothesis draws ------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    policy: Policy
    plans: list[Plan]
    users: dict[str, str]  # user -> IANA zone
    enrolments: dict[str, dict[str, str]]  # user -> plan id -> its ref
    first_day: date
    days: int

    @property
    def end(self) -> datetime:
        """Nothing fires from here on (only deferred sends are still retried)."""
        return datetime.combine(self.first_day + timedelta(days=self.days), time(), UTC)


# Local times from 04:00: no plan fires inside a DST gap or fold of its own zone (the rules about
# those are tested in test_schedule.py); users' zones still cross DST and midnight.
times_of_day = st.builds(time, st.integers(4, 23), st.sampled_from([0, 15, 30, 45]))
small_cap = st.none() | st.integers(1, 3)


@st.composite
def plans(draw: st.DrawFn, index: int, first_day: date) -> Plan:
    category = draw(st.sampled_from(CATEGORIES))
    at = sorted({t.strftime("%H:%M") for t in draw(st.lists(times_of_day, min_size=1, max_size=4))})
    if draw(st.booleans()):
        rule = {"daily": {"at": at}}
    else:
        days = draw(st.lists(st.sampled_from(WEEKDAYS), min_size=1, max_size=4, unique=True))
        rule = {"weekly": {"days": days, "at": at}}
    plan_id = f"p{index}"
    return Plan.model_validate(
        {
            "id": plan_id,
            "name": f"Plan {index}",
            "category": category.value,
            "consent": "long_term",
            "schedule": {
                "calendar": {
                    "timezone": draw(st.sampled_from(ZONES)),
                    "start": first_day.isoformat(),
                    **rule,
                }
            },
            "template": {"id": f"tmpl_{plan_id}", "fields": {"thing1": "thing", "thing2": "thing"}},
            # thing2: the medical disclaimer ("for reference only"), harmless elsewhere.
            "message": {"default": {"thing1": "Step {step} ref {ref}", "thing2": "仅供参考"}},
            "variables": ["ref"],
            "delivery": {
                "on_capped": draw(st.sampled_from(["skip", "defer"])),
                "on_quiet_hours": draw(st.sampled_from(["skip", "defer"])),
                "max_delay": draw(st.sampled_from(["2 hours", "12 hours", "1 day"])),
                "caps": {
                    "user_day": draw(small_cap),
                    "category_week": draw(small_cap),
                    "plan_day": draw(small_cap),
                    "plan_week": draw(small_cap),
                },
                **({"limit_key": "ref"} if category == Category.FINANCE else {}),
            },
        }
    )


@st.composite
def scenarios(draw: st.DrawFn, max_plans: int = 4) -> Scenario:
    policy = Policy.model_validate(
        {
            "caps": {
                # Up to 4 a day and 10 a week: room for the plans' own caps to be the ones
                # that bind, not always the policy's.
                "user_day": draw(st.integers(1, 4)),
                "category_week": {
                    "medical": draw(st.integers(1, 10)),
                    "education": draw(st.integers(1, 10)),
                },
                "category_week_default": draw(st.integers(2, 10)),
            }
        }
    )
    # From early March to early April 2026: New York (Mar 8), London (Mar 29) and Auckland
    # (Apr 5) change their clocks in there.
    first_day = draw(st.dates(date(2026, 3, 4), date(2026, 4, 8)))
    n_plans = draw(st.integers(1, max_plans))
    drawn = [draw(plans(i, first_day)) for i in range(n_plans)]
    zones = draw(st.lists(st.sampled_from(ZONES), min_size=1, max_size=6))
    users = {f"o-{i}": zone for i, zone in enumerate(zones)}
    enrolments = {}
    for user in users:
        chosen = draw(st.sets(st.sampled_from([p.id for p in drawn]), min_size=1))
        enrolments[user] = {p: draw(st.sampled_from(REFS)) for p in sorted(chosen)}
    return Scenario(policy, drawn, users, enrolments, first_day, draw(st.integers(1, 8)))


# --- running one scenario -------------------------------------------------------------------


@dataclass
class Sent:
    at: datetime  # the virtual moment it was handed to the channel
    user: str
    plan: Plan
    ref: str
    step: int


@dataclass
class Recorder:
    """A channel that forwards to the real one and notes when (virtually) each message went."""

    inner: WeChatChannel
    clock: Clock
    by_template: dict[str, Plan]
    sent: list[Sent] = field(default_factory=list)

    async def send(self, message: OutgoingMessage) -> SendResult:
        result = await self.inner.send(message)
        if result.outcome == Outcome.SENT:
            plan = self.by_template[message.template_id]
            _, step, _, ref = message.data["thing1"].split(" ")  # "Step {step} ref {ref}"
            self.sent.append(Sent(self.clock(), message.touser, plan, ref, int(step)))
        return result

    async def quota(self) -> None:
        return None

    async def aclose(self) -> None:
        pass


async def prepare(store: Store, s: Scenario) -> None:
    for plan in s.plans:
        await store.register_plan(plan, "test")
    start = datetime.combine(s.first_day - timedelta(days=1), time(), UTC)
    for user, chosen in s.enrolments.items():
        for plan_id, ref in chosen.items():
            await store.enroll(plan_id, user, start, s.users[user], {"ref": ref}, None)
            await store.record_consent(user, f"tmpl_{plan_id}", "long_term", "accept", "test")


def occurrences(s: Scenario, plan: Plan) -> list[Occurrence]:
    """Every occurrence of the plan from its first local day up to the scenario's end."""
    cal = plan.schedule.calendar
    assert cal is not None
    found = []
    for occurrence in calendar_occurrences(cal, calendar_anchor(cal, s.end)):
        if occurrence.due_at >= s.end:
            break
        found.append(occurrence)
    return found


def fire_times(s: Scenario, plan: Plan) -> list[datetime]:
    return [occurrence.due_at for occurrence in occurrences(s, plan)]


async def next_deferral(store: Store) -> datetime | None:
    return await store.pool.fetchval(
        "SELECT min(defer_until) FROM deliveries WHERE status = 'deferred'"
    )


async def run(store: Store, d: Dispatcher, clock: Clock, s: Scenario) -> int:
    """Fire every occurrence in time order; retry the deferred sends as their moments come;
    after the last fire, go on until no deferral is left. Returns the rows fired."""
    fires = sorted((t, plan.id) for plan in s.plans for t in fire_times(s, plan))
    audience = Counter(p for chosen in s.enrolments.values() for p in chosen)
    expected_rows = sum(audience[plan_id] for _, plan_id in fires)
    for _ in range(MAX_EVENTS):
        deferral = await next_deferral(store)
        if not fires and deferral is None:
            return expected_rows
        if deferral is not None and (not fires or deferral <= fires[0][0]):
            clock.now = max(clock.now, deferral)
            due = await store.pool.fetch(
                "SELECT DISTINCT plan_id FROM deliveries"
                " WHERE status = 'deferred' AND defer_until <= $1 ORDER BY plan_id",
                clock.now,
            )
            for row in due:
                await d.retry_deferred(row["plan_id"])
        else:
            fire_time, plan_id = fires.pop(0)
            clock.now = fire_time
            await d.fire(plan_id, fire_time)
    raise AssertionError(f"more than {MAX_EVENTS} events: the run does not settle")


# --- the property -----------------------------------------------------------------------------


def check_running_counts(
    sent: list[Sent],
    window: Callable[[Sent], Hashable | None],
    limit: Callable[[Sent], int],
    what: str,
) -> None:
    """In send order, the n-th message on a counter (`window(m)`, None: none) is within the limit
    of the plan that sent it (`limit(m)`): what the gate promises for a shared counter."""
    used: Counter = Counter()
    for m in sent:
        key = window(m)
        if key is None:
            continue
        used[key] += 1
        cap = limit(m)
        assert used[key] <= cap, (
            f"{what}: message {used[key]} on {key} went, over the limit of {cap} "
            f"({m.plan.id} at {m.at.isoformat()})"
        )


def expected_limits(plan: Plan, policy: Policy) -> Limits:
    """The limits as docs/rules.md states them: the policy's, made stricter by the plan's own.
    (No exceptions in this test.)"""
    caps, own = policy.caps, plan.delivery.caps

    def stricter(policy_cap: int | None, plan_cap: int | None) -> int | None:
        given_caps = [c for c in (policy_cap, plan_cap) if c is not None]
        return min(given_caps) if given_caps else None

    limits = plan_limits(plan, policy)
    assert (limits.user_day, limits.category_week, limits.plan_day, limits.plan_week) == (
        stricter(caps.user_day, own.user_day),
        stricter(caps.category_week_for(plan.category), own.category_week),
        stricter(caps.plan_day, own.plan_day),
        stricter(caps.plan_week, own.plan_week),
    )
    return limits


def in_quiet_hours(local: datetime, start: time, end: time) -> bool:
    wall = local.time()
    if start == end:
        return False
    return start <= wall < end if start < end else wall >= start or wall < end


async def check(store: Store, fake: FakeWeChat, recorder: Recorder, s: Scenario, rows: int):
    policy, sent = s.policy, recorder.sent
    limits = {p.id: expected_limits(p, policy) for p in s.plans}

    def local(m: Sent) -> datetime:
        return m.at.astimezone(ZoneInfo(s.users[m.user]))

    def day(m: Sent) -> date:
        return local(m).date()

    def week(m: Sent) -> tuple[int, int]:
        return local(m).isocalendar()[:2]

    def lim(m: Sent) -> Limits:
        return limits[m.plan.id]

    check_running_counts(sent, lambda m: (m.user, day(m)), lambda m: lim(m).user_day, "user_day")
    check_running_counts(
        sent,
        lambda m: (m.user, m.plan.category, week(m)),
        lambda m: lim(m).category_week,
        "category_week",
    )
    for plan in s.plans:
        mine = [m for m in sent if m.plan.id == plan.id]
        if limits[plan.id].plan_day is not None:
            check_running_counts(
                mine, lambda m: (m.user, day(m)), lambda m: lim(m).plan_day, "plan_day"
            )
        if limits[plan.id].plan_week is not None:
            check_running_counts(
                mine, lambda m: (m.user, week(m)), lambda m: lim(m).plan_week, "plan_week"
            )
    finance = policy.limited_long_term[Category.FINANCE]
    assert finance.per == "month"
    check_running_counts(
        [m for m in sent if m.plan.category == Category.FINANCE],
        lambda m: (m.user, m.ref, local(m).year, local(m).month),
        lambda m: finance.sends,
        "finance per ref per month",
    )
    for m in sent:
        quiet = lim(m).quiet
        assert not in_quiet_hours(local(m), quiet.start, quiet.end), (
            f"{m.plan.id} sent to {m.user} at {local(m):%Y-%m-%d %H:%M %Z}, inside {quiet}"
        )

    # The ledger: one row per fired (occurrence, user), each with one final outcome, and its sent
    # rows are exactly the messages the fake received.
    ledger = await store.pool.fetch("SELECT plan_id, user_id, status FROM deliveries")
    assert len(ledger) == rows
    assert {r["status"] for r in ledger} <= FINAL, Counter(r["status"] for r in ledger)
    sent_rows = Counter((r["plan_id"], r["user_id"]) for r in ledger if r["status"] == "sent")
    received = Counter((m["template_id"].removeprefix("tmpl_"), m["touser"]) for m in fake.messages)
    recorded = Counter((m.plan.id, m.user) for m in sent)
    assert sent_rows == received == recorded

    # Each user-day counter counted exactly the messages of its user's local day.
    counters = await store.pool.fetch(
        "SELECT key, used FROM cap_counters WHERE key LIKE 'user-day:%' AND used > 0"
    )
    per_day = Counter(f"user-day:{m.user}:{day(m).isoformat()}" for m in sent)
    assert {r["key"]: r["used"] for r in counters} == per_day


@settings(
    max_examples=25,
    deadline=None,
    # No explain phase: a failure is reported (shrunk) sooner, well within the test timeout.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(s=scenarios())
async def test_random_plans_and_users_never_exceed_a_cap(store, fake, channel, s: Scenario):
    await reset_database(store)
    fake.messages.clear()
    await prepare(store, s)
    clock = Clock(datetime.combine(s.first_day - timedelta(days=1), time(), UTC))
    recorder = Recorder(channel, clock, {p.template.id: p for p in s.plans})
    d = Dispatcher(store, recorder, replica_id="prop", clock=clock, policy=s.policy, batch_size=4)

    rows = await run(store, d, clock, s)

    await check(store, fake, recorder, s, rows)


@settings(
    max_examples=15,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(s=scenarios(max_plans=1))
async def test_preview_and_the_gate_agree_on_one_plan(store, fake, channel, s: Scenario):
    """One owner per rule, checked: `preview` and `simulate` decide caps, quiet hours and
    defer-or-skip in Python (`rules.dry_run`), the daemon in the SQL gate. For one plan (dry_run
    counts only that plan's sends), each user's steps go at the same moments, or not at all."""
    await reset_database(store)
    fake.messages.clear()
    await prepare(store, s)
    [plan] = s.plans
    clock = Clock(datetime.combine(s.first_day - timedelta(days=1), time(), UTC))
    recorder = Recorder(channel, clock, {plan.template.id: plan})
    d = Dispatcher(store, recorder, replica_id="prop", clock=clock, policy=s.policy, batch_size=4)

    await run(store, d, clock, s)

    gate = Counter((m.user, m.step, m.at) for m in recorder.sent)
    python = Counter(
        (user, run_.occurrence.step, run_.sent_at)
        for user, chosen in s.enrolments.items()
        for run_ in dry_run(
            plan,
            s.policy,
            occurrences(s, plan),
            ZoneInfo(s.users[user]),
            {"ref": chosen[plan.id]},
            user,
        )
        if run_.sent_at is not None
    )
    assert gate == python, f"plan {plan.model_dump_json()}, caps {s.policy.caps}, users {s.users}"
