"""Plans in virtual time through the real gate: `reminders simulate`, and bench/twelve_weeks.py.

The real `Dispatcher` and `Store` run against the fake WeChat on loopback, on a database of their
own; only the clock is virtual. Time moves from event to event, never sleeping: each calendar
occurrence fires at its time, relative plans are swept at each enrolment's next due time, and at
every moment the deferred sends whose time has come are taken through the gate again (before that
moment's fires). After the window only deferred sends are driven on, until none is left.

After every moment the consent runway (`ConsentStore.runway`, as `/v1/plans/{id}/runway` reports
it) is read: the first moment it says a user's very next step is not covered is the warning the
mini program would have had to ask again.

Simulated users can react (`Behaviour`, `--opens`/`--cancels`): a share of the sends get an open
reported a few minutes later for the delivery (the `rmd` id its card's page carries), and a share
of a step's receivers switch its template off in WeChat's settings a while later, recorded
through the consent store as the WeChat callback records it. Whether a user reacts, and when, is
a hash of the seed, plan, step and user, so a run is the same whatever the order of its sends. At
every moment (after its sends and events) the daemon's engagement guard judges the plans
(`EngagementGuard.check`, the policy in use): a cancellation spike pauses its plan in virtual
time, and the plan sends nothing more. With simulated cancellations the run also stops at the
first sweep after each send leaves the guard's recent window and baseline, the only other
moments its verdict can change.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from scheduler.app import engagement
from scheduler.app.dispatcher import Dispatcher
from scheduler.app.engagement_guard import EngagementGuard
from scheduler.app.lifecycle import Lifecycle
from scheduler.channels.base import OutgoingMessage, SendResult
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.consent import Result, Via
from scheduler.domain.enrolment import default_zone
from scheduler.domain.outcomes import Outcome
from scheduler.domain.plan import ConsentKind, Plan
from scheduler.domain.policy import Policy
from scheduler.domain.schedule import (
    Occurrence,
    calendar_anchor,
    calendar_occurrences,
    localize,
    relative_due,
    relative_occurrences,
)
from scheduler.errors import RemindersError
from scheduler.planfiles import LoadedPlan
from scheduler.store.activity import ActivityReport
from scheduler.store.consent import RUNWAY_LOOKAHEAD, ConsentReport, OpenReport
from scheduler.store.embedded import temporary_embedded
from scheduler.store.postgres import Store
from scheduler.store.scratch import scratch_database
from scheduler.testing.fake_wechat import FakeWeChat

T = TypeVar("T")
SWEEP = timedelta(seconds=30)  # the daemon's default sweep period (REMINDERS_SWEEP_SECONDS)
Key = tuple[str, str | None]  # (status, reason) of a ledger row


class SimulationError(RemindersError):
    """An argument of `reminders simulate` that cannot work (one line for the user)."""


# --- the audience -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One user's enrolment in one plan, with the consent they gave for its template."""

    plan: str
    credits: int | None = None  # one-time plans: credits granted; None: none at all
    long_term: bool = True  # long-term plans: whether the user accepted the template
    variables: dict[str, str] = field(default_factory=dict)
    start: datetime | None = None  # relative plans: the enrolment's start (None: the run's)


@dataclass(frozen=True)
class User:
    id: str
    tz: str
    plans: tuple[Member, ...]
    why: str = ""


# --- what the users do with their messages -----------------------------------------------------

DEFAULT_SEED = 1
# How long after the send a simulated user reacts: 5 minutes to 1 hour (an open) or to 2 hours (a
# cancellation), in steps of 5 minutes, drawn per delivery.
OPEN_DELAYS = tuple(timedelta(minutes=5 * k) for k in range(1, 13))
CANCEL_DELAYS = tuple(timedelta(minutes=5 * k) for k in range(1, 25))
OPEN_SCENE = 1014  # opened from the notification card (scheduler.domain.tracking)
SOURCE = "simulate"


@dataclass(frozen=True)
class Rates:
    """A share of deliveries per plan and step: a step's own rate, else its plan's, else 0."""

    plans: dict[str, Fraction] = field(default_factory=dict)
    steps: dict[tuple[str, int], Fraction] = field(default_factory=dict)

    def of(self, plan_id: str, step: int) -> Fraction:
        return self.steps.get((plan_id, step), self.plans.get(plan_id, Fraction(0)))

    def __bool__(self) -> bool:
        return any(self.plans.values()) or any(self.steps.values())

    def describe(self) -> str:
        """e.g. `rehab-weekly 1.0 %, rehab-weekly step 6 30.0 %` (`none` without any)."""
        items = [f"{p} {_percent(r)}" for p, r in sorted(self.plans.items())] + [
            f"{p} step {n} {_percent(r)}" for (p, n), r in sorted(self.steps.items())
        ]
        return ", ".join(items) or "none"


def _percent(rate: Fraction) -> str:
    return f"{float(rate) * 100:.1f} %"


@dataclass(frozen=True)
class Behaviour:
    """The simulated users' reactions (`--opens`, `--cancels`, `--seed`): each delivery WeChat
    accepted is opened with the `opens` rate of its plan and step, and its user switches the
    template off in WeChat's settings with the `cancels` rate; whether, and after which delay, is
    a hash of the seed, plan, step and user."""

    opens: Rates = field(default_factory=Rates)
    cancels: Rates = field(default_factory=Rates)
    seed: int = DEFAULT_SEED

    def draw(self, what: str, plan_id: str, step: int, user_id: str) -> tuple[Fraction, int]:
        """A uniform number in [0, 1) and a whole number, the same for the same arguments."""
        key = f"{self.seed}/{what}/{plan_id}/{step}/{user_id}".encode()
        digest = hashlib.sha256(key).digest()
        return Fraction(int.from_bytes(digest[:8]), 1 << 64), int.from_bytes(digest[8:16])

    def reactions(
        self, plan_id: str, step: int, user_id: str, sent_at: datetime
    ) -> list[tuple[datetime, str]]:
        """(when, "open" or "cancel") this user does with this delivery."""
        out = []
        for what, rates, delays in (
            ("open", self.opens, OPEN_DELAYS),
            ("cancel", self.cancels, CANCEL_DELAYS),
        ):
            u, k = self.draw(what, plan_id, step, user_id)
            if u < rates.of(plan_id, step):
                out.append((sent_at + delays[k % len(delays)], what))
        return out


@dataclass(frozen=True)
class GuardPause:
    """A pause of the engagement guard during the run: when, why (its reason has the figures),
    and the steps it held back until the end of the window (not in the ledger: a resume records
    them skipped:paused, or sends those still within the grace with --catch-up)."""

    plan: str
    at: datetime
    rule: str
    reason: str
    details: dict[str, Any]
    held_back: int = 0  # steps of enrolments
    held_steps: tuple[int, ...] = ()
    held_users: int = 0


# --- the run ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: datetime):
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Send:
    user_id: str
    template_id: str
    at: datetime  # virtual time (UTC) at which WeChat accepted it
    msgid: int | None = None


class RecordingChannel:
    """The real WeChat channel, noting the virtual time of every accepted send."""

    def __init__(self, channel: WeChatChannel, clock: Clock):
        self.channel = channel
        self.clock = clock
        self.sends: list[Send] = []

    async def send(self, message: OutgoingMessage) -> SendResult:
        result = await self.channel.send(message)
        if result.outcome == Outcome.SENT:
            self.sends.append(Send(message.touser, message.template_id, self.clock(), result.msgid))
        return result

    async def quota(self) -> None:
        return None

    async def aclose(self) -> None:
        await self.channel.aclose()


@dataclass(frozen=True)
class Line:
    """One ledger row of a user's timeline."""

    at: datetime  # when it went out (a deferred send: when it was retried), else when it was due
    plan: str
    step: int
    status: str
    reason: str | None
    deferred: str | None = None  # why it was deferred first, if it was
    variant: str | None = None  # the step's content variant the user got (None: its only one)
    extra: str | None = None  # an adapt rule's extra step (message.extra.NAME)


@dataclass(frozen=True)
class Runway:
    """One enrolment's consent runway: at the start, and the first warning that it ran dry."""

    covered: int | None  # upcoming steps covered at the start (None: all)
    dry_step: int | None  # the first step not covered, at the start
    warned_at: datetime | None = None  # first moment the runway said the next step is not covered
    warned_step: int | None = None
    warned_due: datetime | None = None


@dataclass
class Report:
    """What the ledger says after the run, per plan and per user, and how the run went."""

    start: datetime
    end: datetime
    zones: dict[str, str]  # user -> IANA zone
    counts: dict[str, Counter[Key]] = field(default_factory=dict)
    by_user: dict[tuple[str, str], Counter[Key]] = field(default_factory=dict)  # (user, plan)
    # plan -> the final (status, reason) of its rows that were deferred at some point
    deferred_fate: dict[str, Counter[Key]] = field(default_factory=dict)
    left: list[dict[str, Any]] = field(default_factory=list)  # rows pending or deferred at the end
    sends: list[tuple[str, str, datetime]] = field(default_factory=list)  # (user, plan, when)
    timeline: dict[str, list[Line]] = field(default_factory=dict)  # user -> rows by time
    runway: dict[tuple[str, str], Runway] = field(default_factory=dict)  # (plan, user)
    behaviour: Behaviour | None = None  # the simulated users' reactions, if any
    reacted: dict[str, Counter[str]] = field(default_factory=dict)  # plan -> opens, cancels
    pauses: list[GuardPause] = field(default_factory=list)  # the engagement guard's, in order
    checks: int = 0  # engagement guard checks
    engagement: dict[str, dict[str, Any]] = field(default_factory=dict)  # plan -> report --by step
    steps: int = 0  # distinct virtual moments the run stopped at
    fires: int = 0  # calendar fires
    sweeps: int = 0  # relative-plan sweeps
    retries: int = 0  # retry_deferred calls
    seconds: float = 0.0

    def total(self) -> Counter[Key]:
        return sum(self.counts.values(), Counter())

    def deferred_then(self, status: str, reason: str | None = None) -> int:
        return sum(c[(status, reason)] for c in self.deferred_fate.values())

    def most_per_local_day(self) -> int:
        """The most sends any user got on one local calendar day (all plans together)."""
        per_day = Counter(
            (user, at.astimezone(ZoneInfo(self.zones[user])).date()) for user, _, at in self.sends
        )
        return max(per_day.values(), default=0)


async def _grant(store: Store, user: User, plan: Plan, member: Member) -> None:
    if plan.consent == ConsentKind.LONG_TERM:
        accepts = 1 if member.long_term else 0
    else:
        accepts = member.credits or 0
    reports = [
        ConsentReport(user.id, plan.template.id, Result.ACCEPT, "sim", plan.consent)
        for _ in range(accepts)
    ]
    if reports:
        await store.consent.record(reports)


async def _setup(
    store: Store,
    loaded: Sequence[LoadedPlan],
    users: Sequence[User],
    start: datetime,
) -> None:
    plans = {item.plan.id: item.plan for item in loaded}
    for item in loaded:
        plan = item.plan
        await store.register_plan(plan, f"plans/{item.path.name}")
    # The store stamps registered_at with the real clock; a calendar plan without a start date
    # counts its steps from it: loaded at the run's start in virtual time instead.
    await store.simulation.register_all_at(start)
    for user in users:
        for member in user.plans:
            plan = plans[member.plan]
            begins = member.start or start
            rule = plan.schedule.relative
            due = relative_due(rule, begins, ZoneInfo(user.tz), 0) if rule else None
            await store.enroll(plan.id, user.id, begins, user.tz, member.variables, due)
            await _grant(store, user, plan, member)


def _calendar_events(
    plans: Sequence[Plan], start: datetime, end: datetime
) -> dict[datetime, list[str]]:
    """Every calendar occurrence in [start, end), by time, plans in id order."""
    events: dict[datetime, list[str]] = defaultdict(list)
    for plan in plans:
        cal = plan.schedule.calendar
        if cal is None:
            continue
        for occurrence in calendar_occurrences(cal, calendar_anchor(cal, start)):
            if occurrence.due_at >= end:
                break
            if occurrence.due_at >= start:
                events[occurrence.due_at].append(plan.id)
    return {t: sorted(ids) for t, ids in events.items()}


async def run(
    url: str,
    loaded: Sequence[LoadedPlan],
    policy: Policy,
    users: Sequence[User],
    start: datetime,
    end: datetime,
    opt_outs: Sequence[tuple[datetime, str, str]] = (),
    activity: Sequence[ActivityReport] = (),
    *,
    behaviour: Behaviour | None = None,
    engagement_report: bool = False,
    sweep: timedelta = SWEEP,
) -> Report:
    """Run `loaded` for `users` over [start, end) on the empty database at `url` (migrated here).

    `opt_outs` are (when, user, reason): an opt-out of every plan, applied at the first moment at
    or after `when`. `activity` is what the users are reported doing (`simulated_activity`),
    stored up front: adapt rules count each report from its time on. `behaviour`: what the
    users do with their messages (opens, cancellations); the engagement guard judges the plans
    at every moment either way. `engagement_report`: each plan's engagement report by step
    (`reminders report PLAN`) read at the end, in `Report.engagement`. `sweep`: the daemon's
    sweep period, the guard's (the first sweep after a send leaves its windows).
    """
    started = time.perf_counter()
    plans = [item.plan for item in loaded]
    template_plan = {p.template.id: p.id for p in plans}
    report = Report(start, end, {u.id: u.tz for u in users}, behaviour=behaviour)
    async with Store.open(url) as store:
        await store.migrate()
        fake = FakeWeChat(keep_messages=False)
        base_url = await fake.start()
        clock = Clock(start)
        channel = RecordingChannel(
            WeChatChannel(base_url=base_url, appid="sim", secret="sim", retries=1), clock
        )
        try:
            lifecycle = Lifecycle(store, clock=clock)
            dispatcher = Dispatcher(
                store,
                channel,
                replica_id="simulate",
                clock=clock,
                policy=policy,
                lifecycle=lifecycle,
            )
            # The daemon's guard, as `Daemon` builds it, on the simulation's policy.
            guard = EngagementGuard(store, lifecycle, policy=lambda: dispatcher.policy)
            await _setup(store, loaded, users, start)
            if activity:
                await store.activity.record(activity)
            drive = _Drive(store, dispatcher, lifecycle, clock, report, users)
            drive.react = _Reactions(store, channel, plans, behaviour or Behaviour(), report)
            drive.guard = guard
            drive.edges = _Edges(policy, sweep, end) if behaviour and behaviour.cancels else None
            await drive.run(plans, _calendar_events(plans, start, end), sorted(opt_outs))
            await _read_ledger(store, report, drive.deferred)
            await _held_back(store, plans, report)
            report.sends = [(s.user_id, template_plan[s.template_id], s.at) for s in channel.sends]
            if engagement_report:
                now = max(end, clock.now + timedelta(seconds=1))
                window = policy.engagement.attribution_window.as_timedelta()
                for plan in plans:
                    found = await engagement.report(
                        store, plan.id, now=now, window=window, guard=policy.guard_for(plan.id)
                    )
                    if found is not None:
                        report.engagement[plan.id] = found
        finally:
            await channel.aclose()
            await fake.stop()
    report.seconds = time.perf_counter() - started
    return report


class _Reactions:
    """The simulated users' opens and cancellations of the sends WeChat accepted: each send's
    ledger row is found by its msgid, its reactions queued at their moments, and recorded there
    through the real paths (`ConsentStore.record_opens`, `ConsentStore.record`)."""

    def __init__(
        self,
        store: Store,
        channel: RecordingChannel,
        plans: Sequence[Plan],
        behaviour: Behaviour,
        report: Report,
    ):
        self.store = store
        self.channel = channel
        self.plans = {p.id: p for p in plans}
        self.behaviour = behaviour
        self.report = report
        self.seen = 0  # sends of the channel already looked at
        self.queue: list[tuple[datetime, int, str, dict[str, Any]]] = []  # a heap
        self.order = itertools.count()

    def next_at(self) -> datetime | None:
        return self.queue[0][0] if self.queue else None

    async def sent(self) -> list[dict[str, Any]]:
        """The ledger rows of the sends since the last call, their reactions queued (none
        without any reaction to simulate)."""
        new = self.channel.sends[self.seen :]
        self.seen = len(self.channel.sends)
        if not new or not (self.behaviour.opens or self.behaviour.cancels):
            return []
        when = {s.msgid: s.at for s in new if s.msgid is not None}
        rows = await self.store.simulation.sent_by_msgid(list(when))
        for row in rows:
            for at, what in self.behaviour.reactions(
                row["plan_id"], row["step"], row["user_id"], when[row["msgid"]]
            ):
                heapq.heappush(self.queue, (at, next(self.order), what, row))
        return rows

    async def due(self, now: datetime) -> int:
        """Record the reactions whose moment has come, each at its own time; returns how many
        were cancellations."""
        opens: list[OpenReport] = []
        cancels: list[ConsentReport] = []
        while self.queue and self.queue[0][0] <= now:
            at, _, what, row = heapq.heappop(self.queue)
            plan = self.plans[row["plan_id"]]
            counted = self.report.reacted.setdefault(plan.id, Counter())
            counted[what] += 1
            if what == "open":
                opens.append(OpenReport(row["user_id"], OPEN_SCENE, at, row["id"], SOURCE))
            else:  # the settings switch turned off, as the WeChat callback records it
                cancels.append(
                    ConsentReport(
                        row["user_id"],
                        plan.template.id,
                        Result.REJECT,
                        f"{SOURCE}:settings",
                        kind=plan.consent,
                        via=Via.SETTINGS,
                        occurred_at=at,
                    )
                )
        if opens:
            await self.store.consent.record_opens(opens)
        if cancels:
            await self.store.consent.record(cancels)
        return len(cancels)


class _Edges:
    """The first sweep after each send's due time leaves the guard's recent window, and its
    baseline: moments (before the end) at which the verdict may change with nothing new."""

    def __init__(self, policy: Policy, sweep: timedelta, end: datetime):
        guards = [policy.guard_for(p) for p in policy.exceptions] + [policy.engagement]
        self.after = sorted(
            {g.recent_window.as_timedelta() + sweep for g in guards}
            | {
                g.recent_window.as_timedelta() + g.baseline_window.as_timedelta() + sweep
                for g in guards
            }
        )
        self.end = end
        self.times: list[datetime] = []  # a heap

    def sent(self, rows: Sequence[dict[str, Any]]) -> None:
        for due in {r["due_at"] for r in rows}:
            for after in self.after:
                if due + after < self.end:
                    heapq.heappush(self.times, due + after)

    def next_after(self, prev: datetime) -> datetime | None:
        while self.times and self.times[0] <= prev:
            heapq.heappop(self.times)
        return self.times[0] if self.times else None


async def _held_back(store: Store, plans: Sequence[Plan], report: Report) -> None:
    """What each pause held back until the end: the steps its plan's active enrolments had due
    from the pause to the end (calendar plans: each occurrence for each enrolment)."""
    by_id = {p.id: p for p in plans}
    for n, pause in enumerate(report.pauses):
        plan = by_id[pause.plan]
        steps: Counter[int] = Counter()
        users = 0
        for row in await store.simulation.active_enrolments(plan.id):
            held = steps.total()
            if plan.schedule.relative is not None:
                upcoming: Iterator[Occurrence] = relative_occurrences(
                    plan, row["start_at"], ZoneInfo(row["tz"])
                )
                upcoming = (o for o in upcoming if o.step > row["next_step"])
            else:
                cal = plan.schedule.calendar
                assert cal is not None
                upcoming = calendar_occurrences(cal, calendar_anchor(cal, report.start))
            for o in itertools.takewhile(lambda o: o.due_at < report.end, upcoming):
                if o.due_at >= pause.at:
                    steps[o.step] += 1
            users += steps.total() > held
        report.pauses[n] = replace(
            pause, held_back=steps.total(), held_steps=tuple(sorted(steps)), held_users=users
        )


class _Drive:
    """Moves the clock from moment to moment: the next calendar occurrence, the next relative
    due time (both before the end), or the next deferred send's moment (any time)."""

    def __init__(
        self,
        store: Store,
        dispatcher: Dispatcher,
        lifecycle: Lifecycle,
        clock: Clock,
        report: Report,
        users: Sequence[User],
    ):
        self.store = store
        self.dispatcher = dispatcher
        self.lifecycle = lifecycle
        self.clock = clock
        self.report = report
        self.enrolled = {(m.plan, u.id) for u in users for m in u.plans}
        # every row ever seen deferred -> (why, until when): a deferred send goes at its moment
        self.deferred: dict[int, tuple[str, datetime]] = {}
        self.react: _Reactions | None = None  # the users' opens and cancellations
        self.guard: EngagementGuard | None = None  # judges the plans at every moment
        self.edges: _Edges | None = None  # sends leaving the guard's windows

    async def run(
        self,
        plans: Sequence[Plan],
        events: dict[datetime, list[str]],
        opt_outs: list[tuple[datetime, str, str]],
    ) -> None:
        store, report, clock = self.store, self.report, self.clock
        relative = sorted(p.id for p in plans if p.is_relative)
        fire_times = sorted(events)
        await self._read_runway(plans, first=True)
        prev = report.start - timedelta(microseconds=1)
        i = 0
        while True:
            candidates = fire_times[i : i + 1]
            next_due = await store.simulation.next_relative_due(relative, prev, report.end)
            next_retry = await store.simulation.next_deferred_retry(prev)
            next_reaction = self.react.next_at() if self.react else None
            next_edge = self.edges.next_after(prev) if self.edges else None
            candidates += [
                t for t in (next_due, next_retry, next_reaction, next_edge) if t is not None
            ]
            if not candidates:
                break
            now = min(candidates)
            opted = bool(opt_outs) and opt_outs[0][0] <= now
            while opt_outs and opt_outs[0][0] <= now:
                at, user, reason = opt_outs.pop(0)
                clock.now = at
                await self.lifecycle.opt_out(user, plan_id=None, actor="simulate", reason=reason)
            clock.now = now
            report.steps += 1
            # What the users did by now first (each at its own time), then the deferred sends whose
            # moment has come, then the fires due now, then the sweep; the guard judges last.
            # The runway reads consent and progress: after opens alone, or at a window's edge, it
            # says what it said.
            changed = now in (next_due, next_retry) or opted
            if self.react is not None and await self.react.due(now):
                changed = True
            for plan_id in sorted(await store.plans_with_due_deferrals(now)):
                await self.dispatcher.retry_deferred(plan_id)
                report.retries += 1
                changed = True
            if i < len(fire_times) and fire_times[i] == now:
                for plan_id in events[now]:
                    await self.dispatcher.fire(plan_id, now)
                    report.fires += 1
                i += 1
                changed = True
            if next_due is not None and next_due == now:
                for plan_id in relative:
                    await self.dispatcher.fire(plan_id, now)
                    report.sweeps += 1
                changed = True
            for row in await store.simulation.deferred():
                first = self.deferred.get(row["id"], (row["reason"], now))[0]
                self.deferred[row["id"]] = (first, row["defer_until"])
            if self.react is not None:
                sent = await self.react.sent()
                if self.edges is not None:
                    self.edges.sent(sent)
            await self._judge()
            if changed:
                await self._read_runway(plans)
            prev = now

    async def _judge(self) -> None:
        """The daemon's engagement guard check, as at every sweep; its pauses noted."""
        if self.guard is None:
            return
        self.report.checks += 1
        for result in await self.guard.check():
            assert result.plan_id is not None
            self.report.pauses.append(
                GuardPause(
                    result.plan_id,
                    result.at,
                    str(result.details.get("rule", "")),
                    result.reason or "",
                    dict(result.details),
                )
            )

    async def _read_runway(self, plans: Sequence[Plan], *, first: bool = False) -> None:
        now = self.clock.now
        for plan in plans:
            runway = await self.store.consent.runway(plan.id, now=now, limit=10_000)
            if runway is None:
                continue
            dry = {u.user_id: u for u in runway.runs_dry}
            if first:
                for user_id in self.report.zones:
                    if (plan.id, user_id) in self.enrolled:
                        u = dry.get(user_id)
                        self.report.runway[(plan.id, user_id)] = (
                            Runway(u.covered, u.dry_step) if u else Runway(None, None)
                        )
            for user_id in runway.dry_next_users:
                key = (plan.id, user_id)
                note = self.report.runway.get(key)
                if note is not None and note.warned_at is None:
                    u = dry[user_id]
                    self.report.runway[key] = replace(
                        note, warned_at=now, warned_step=u.dry_step, warned_due=u.dry_at
                    )


async def _read_ledger(
    store: Store, report: Report, deferred: dict[int, tuple[str, datetime]]
) -> None:
    for row in await store.simulation.ledger():
        key = (row["status"], row["reason"])
        report.counts.setdefault(row["plan_id"], Counter())[key] += 1
        report.by_user.setdefault((row["user_id"], row["plan_id"]), Counter())[key] += 1
        why, until = deferred.get(row["id"], (None, row["due_at"]))
        if why is not None:
            report.deferred_fate.setdefault(row["plan_id"], Counter())[key] += 1
        at = until if row["status"] == "sent" else row["due_at"]
        variant = row["variant"]
        extra = variant.removeprefix("extra:") if variant and variant.startswith("extra:") else None
        line = Line(
            at,
            row["plan_id"],
            row["step"],
            row["status"],
            row["reason"],
            why,
            None if extra is not None else variant,
            extra,
        )
        report.timeline.setdefault(row["user_id"], []).append(line)
    for lines in report.timeline.values():
        lines.sort(key=lambda line: (line.at, line.plan))
    report.left = await store.simulation.unfinished()


# --- on a database of its own -------------------------------------------------------------------


def on_scratch_database(server_url: str | None, work: Callable[[str], Awaitable[T]]) -> T:
    """`work(url)` on a new database, dropped afterwards: on the server of `server_url`
    (DATABASE_URL), or without one on an embedded PostgreSQL in a temporary folder."""
    if server_url is None:
        with temporary_embedded("reminders-sim-") as url:
            return on_scratch_database(url, work)
    return asyncio.run(_scratch(server_url, work))


async def _scratch(server_url: str, work: Callable[[str], Awaitable[T]]) -> T:
    async with scratch_database(server_url) as url:
        return await work(url)


# --- the simulated users of `reminders simulate` ------------------------------------------------

CONSENT_ITEM = re.compile(
    r"(?:(?P<plan>[A-Za-z0-9_.-]+)=)?(?P<choice>long_term|none|one_time:(?P<credits>\d+))"
)
CONSENT_SYNTAX = (
    "write long_term, one_time:N or none, each optionally as PLAN_ID=..., comma-separated"
)
Choice = str | int  # "long_term", "none", or a number of one-time credits


def parse_consent(spec: str | None, plans: Sequence[Plan]) -> dict[str, Choice | None]:
    """Each plan's consent under `--consent SPEC` (docs/plans.md); None: fully covered (a
    long-term acceptance, or one credit for each step). A choice without a plan id applies to
    every plan of its kind (`none` to all of them); a choice naming a plan wins over it."""
    by_id = {p.id: p for p in plans}
    unnamed: dict[ConsentKind | None, Choice] = {}
    named: dict[str, Choice] = {}
    for item in (i.strip() for i in spec.split(",")) if spec is not None else ():
        match = CONSENT_ITEM.fullmatch(item)
        if match is None:
            raise SimulationError(f"--consent {item!r}: {CONSENT_SYNTAX}")
        choice: Choice = int(match["credits"]) if match["credits"] else match["choice"]
        kind = {"none": None, "long_term": ConsentKind.LONG_TERM}.get(
            str(choice), ConsentKind.ONE_TIME
        )
        plan_id = match["plan"]
        if plan_id is None:
            if kind is not None and all(p.consent != kind for p in plans):
                raise SimulationError(
                    f"--consent {item}: none of the plans is {kind.value} ({_kinds(plans)})"
                )
            unnamed[kind] = choice
        elif plan_id not in by_id:
            raise SimulationError(
                f"--consent {item}: no plan {plan_id} among the files (plans: {', '.join(by_id)})"
            )
        elif kind not in (None, by_id[plan_id].consent):
            raise SimulationError(f"--consent {item}: {_kinds([by_id[plan_id]])}")
        else:
            named[plan_id] = choice
    return {p.id: named.get(p.id, unnamed.get(p.consent, unnamed.get(None))) for p in plans}


ACTIVITY_ITEM = re.compile(r"(?P<pattern>daily|once)(?::(?P<users>[0-9]{1,7}))?")
ACTIVITY_SYNTAX = (
    "write daily:N or once:N (the next N users are reported active every day at 20:00 "
    "their time, or only on the first day), comma-separated, e.g. daily:1,once:1"
)


def simulated_activity(
    spec: str | None, users: Sequence[User], start: datetime, end: datetime
) -> tuple[list[ActivityReport], dict[str, str]]:
    """What `--activity SPEC` reports of the users, in user order: `daily:N` users are active
    every day of the run at 20:00 in their zone, `once:N` ones on its first day only, the others
    never. Returns the reports and each reported user's pattern."""
    reports: list[ActivityReport] = []
    patterns: dict[str, str] = {}
    queue = iter(users)
    for item in (i.strip() for i in spec.split(",")) if spec else ():
        match = ACTIVITY_ITEM.fullmatch(item)
        if match is None:
            raise SimulationError(f"--activity {item!r}: {ACTIVITY_SYNTAX}")
        for user in itertools.islice(queue, int(match["users"] or 1)):
            patterns[user.id] = match["pattern"]
            zone, day = ZoneInfo(user.tz), start.astimezone(ZoneInfo(user.tz)).date()
            while True:
                at = localize(datetime.combine(day, datetime.min.time().replace(hour=20)), zone)
                if at >= end:
                    break
                if at >= start:
                    event = f"sim:{user.id}:{day.isoformat()}"
                    reports.append(ActivityReport(user.id, at, event, "sim", "simulated"))
                    if match["pattern"] == "once":
                        break
                day += timedelta(days=1)
    return reports, patterns


RATE_ITEM = re.compile(
    r"(?:(?P<plan>[A-Za-z0-9_.-]+):(?:(?P<step>\d+):)?)?(?P<rate>(?:\d+(?:\.\d*)?|\.\d+)(?P<pc>%)?)"
)
RATE_SYNTAX = "write RATE, PLAN_ID:RATE or PLAN_ID:STEP:RATE, a rate as 0.3 or 30%, comma-separated"


def parse_rates(option: str, spec: str | None, plans: Sequence[Plan]) -> Rates:
    """The shares of `--opens SPEC` or `--cancels SPEC` (docs/plans.md): a rate without a plan id
    applies to every plan (for `--opens`, every plan whose cards open a page), one naming a plan
    wins over it, one naming a step of it wins over that. Later items win over earlier ones."""
    by_id = {p.id: p for p in plans}
    unnamed: Fraction | None = None
    named: dict[str, Fraction] = {}
    steps: dict[tuple[str, int], Fraction] = {}
    for item in (i.strip() for i in spec.split(",")) if spec is not None else ():
        match = RATE_ITEM.fullmatch(item)
        if match is None:
            raise SimulationError(f"{option} {item!r}: {RATE_SYNTAX}")
        text = match["rate"].removesuffix("%")
        rate = Fraction(text) / (100 if match["pc"] else 1)
        if rate > 1:
            raise SimulationError(f"{option} {item}: a rate is from 0 to 1 (or 0% to 100%)")
        plan_id = match["plan"]
        if plan_id is None:
            unnamed = rate
            continue
        plan = by_id.get(plan_id)
        if plan is None:
            raise SimulationError(
                f"{option} {item}: no plan {plan_id} among the files (plans: {', '.join(by_id)})"
            )
        if option == "--opens" and not plan.template.page:
            raise SimulationError(
                f"{option} {item}: plan {plan_id}'s template has no page: its cards open nothing"
            )
        if match["step"] is None:
            named[plan_id] = rate
            continue
        step, most = int(match["step"]), _step_count(plan)
        if step < 1 or (most is not None and step > most):
            has = f"has {most} steps" if most is not None else "counts its steps from 1"
            raise SimulationError(f"{option} {item}: plan {plan_id} {has}")
        steps[(plan_id, step)] = rate
    rates = dict(named)
    if unnamed is not None:
        takers = [p for p in plans if option != "--opens" or p.template.page]
        if not takers:
            raise SimulationError(
                f"{option} {spec}: none of the plans' templates has a page: their cards open "
                "nothing"
            )
        rates = {p.id: unnamed for p in takers} | named
    return Rates(rates, steps)


def parse_behaviour(
    opens: str | None, cancels: str | None, plans: Sequence[Plan], seed: int = DEFAULT_SEED
) -> Behaviour | None:
    """`--opens`, `--cancels` and `--seed`; None when neither option is given."""
    if opens is None and cancels is None:
        return None
    return Behaviour(
        parse_rates("--opens", opens, plans), parse_rates("--cancels", cancels, plans), seed
    )


def _step_count(plan: Plan) -> int | None:
    """How many steps the plan has (None: no end)."""
    if (cal := plan.schedule.calendar) is not None:
        return cal.count
    start = datetime(2026, 1, 5, tzinfo=UTC)  # a relative plan's steps do not depend on it
    return sum(1 for _ in relative_occurrences(plan, start, ZoneInfo("UTC")))


def _kinds(plans: Sequence[Plan]) -> str:
    return ", ".join(f"{p.id} is {p.consent.value}" for p in plans)


def audience(
    plans: Sequence[Plan],
    consent: dict[str, Choice | None],
    *,
    users: int,
    tz: str,
    start: datetime,
    end: datetime,
    variables: dict[str, str],
) -> tuple[User, ...]:
    """`users` users o-sim-1... in zone `tz`, each enrolled in every plan at `start`, with the
    consent `consent` gives them; a variable not in `variables` is "<name> A" for user 1, "<name>
    B" for user 2... (no digits: a `name` field refuses them)."""
    declared = {v for p in plans for v in p.variables}
    if unknown := sorted(set(variables) - declared):
        raise SimulationError(
            f"--var {unknown[0]}: no plan declares it (they declare: "
            f"{', '.join(sorted(declared)) or 'none'})"
        )
    zone = ZoneInfo(tz)
    members: list[tuple[Plan, dict[str, Any]]] = []  # a plan and its Member's consent fields
    for plan in plans:
        choice = consent[plan.id]
        if plan.consent == ConsentKind.LONG_TERM:
            members.append((plan, {"long_term": choice != "none"}))
        elif choice is None:
            members.append((plan, {"credits": _every_step(plan, start, end, zone)}))
        else:
            members.append((plan, {"credits": 0 if choice == "none" else int(choice)}))
    return tuple(
        User(
            f"o-sim-{n}",
            tz,
            tuple(
                Member(
                    plan.id,
                    variables={v: variables.get(v, f"{v} {_letters(n)}") for v in plan.variables},
                    **grant,
                )
                for plan, grant in members
            ),
        )
        for n in range(1, users + 1)
    )


def _every_step(plan: Plan, start: datetime, end: datetime, tz: ZoneInfo) -> int:
    """One credit for each step from `start`: all of the plan's, or those before `end` when the
    plan never ends (at most the runway's look-ahead)."""
    if (cal := plan.schedule.calendar) is not None:
        occurrences = calendar_occurrences(cal, calendar_anchor(cal, start))
        ends = cal.count is not None or cal.end is not None
    else:
        occurrences = relative_occurrences(plan, start, tz)
        ends = True  # a relative plan has a count or a duration
    steps: Iterator[Occurrence] = (o for o in occurrences if o.due_at >= start)
    if not ends:
        steps = itertools.takewhile(lambda o: o.due_at < end, steps)
    return sum(1 for _ in itertools.islice(steps, RUNWAY_LOOKAHEAD))


def _letters(n: int) -> str:
    """1 -> A, 26 -> Z, 27 -> AA (spreadsheet columns)."""
    text = ""
    while n:
        n, rest = divmod(n - 1, 26)
        text = chr(ord("A") + rest) + text
    return text


def default_start(plans: Sequence[Plan], now: datetime) -> datetime:
    """The earliest `start` of the calendar plans that have one, else the next Monday 00:00 in
    the first plan's zone."""
    starts = [
        localize(cal.start, ZoneInfo(cal.timezone))
        for p in plans
        if (cal := p.schedule.calendar) is not None and cal.start is not None
    ]
    if starts:
        return min(starts)
    local = now.astimezone(ZoneInfo(default_zone(plans[0])))
    monday = local.date() + timedelta(days=7 - local.weekday())
    return datetime.combine(monday, datetime.min.time(), local.tzinfo)


# --- the report ---------------------------------------------------------------------------------


def label(key: Key) -> str:
    status, reason = key
    return status if reason is None else f"{status}:{reason}"


def render_table(report: Report) -> str:
    """Ledger rows per plan by status:reason, and how many deferred rows went out later."""
    total = report.total()
    keys = sorted(total, key=lambda k: (k[0] != "sent", k[0], k[1] or ""))
    columns = [label(k) for k in keys] + ["deferred→sent"]
    rows = [
        [plan_id]
        + [str(report.counts[plan_id][k]) for k in keys]
        + [str(report.deferred_fate.get(plan_id, Counter())[("sent", None)])]
        for plan_id in sorted(report.counts)
    ]
    rows.append(["TOTAL"] + [str(total[k]) for k in keys] + [str(report.deferred_then("sent"))])
    widths = [max(len(r[c]) for r in [["plan", *columns], *rows]) for c in range(len(columns) + 1)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if n == 0 else cell.rjust(w)
            for n, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = line(["-" * w for w in widths])
    return "\n".join([line(["plan", *columns]), rule, *map(line, rows[:-1]), rule, line(rows[-1])])


def local(moment: datetime, tz: str) -> str:
    """A moment in a zone with its UTC offset: 2026-12-07 Mon 09:00+08:00."""
    at = moment.astimezone(ZoneInfo(tz))
    return f"{at:%Y-%m-%d %a %H:%M}{at.isoformat()[19:]}"


def render(report: Report, *, lines: int = 8) -> str:
    """The human report of `reminders simulate`: counts, runway, each user's first lines."""
    zone = next(iter(report.zones.values()), "UTC")
    users = f"{len(report.zones)} user{'s' if len(report.zones) != 1 else ''}"
    out = [
        f"{local(report.start, zone)} to {local(report.end, zone)} ({zone}), "
        f"{users}: {report.fires} calendar fires, {report.sweeps} sweeps, "
        f"{report.retries} deferred retries, {report.seconds:.1f} s",
        "",
        render_table(report) if report.counts else "no step fell due in the window",
        *render_guard(report),
        "",
        "consent runway (what /v1/plans/{id}/runway said along the way):",
    ]
    # Users whose runway reads the same are one line: "3 users" when they are all of them.
    said: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
    for (plan_id, user), way in sorted(report.runway.items()):
        said[(plan_id, _runway_text(way, report.zones[user]))].append(user)
    width = max((len(p) for p, _ in said), default=0)
    for (plan_id, text), who in said.items():
        everyone = len(who) == sum(plan_id == p for p, _ in report.runway)
        names = f"{len(who)} users" if everyone and len(who) > 1 else ", ".join(who)
        out.append(f"  {plan_id:<{width}}  {names}: {text[0]}")
        out += [f"  {'':<{width}}    {more}" for more in text[1:]]
    width = max((len(p) for p in report.counts), default=0)
    # Users with the same timeline (in the same zone) are one entry, named by its first user.
    groups: dict[tuple[str, tuple[Line, ...]], list[str]] = {}
    for user, tz in report.zones.items():
        groups.setdefault((tz, tuple(report.timeline.get(user, []))), []).append(user)
    for (tz, timeline), members in groups.items():
        shown = timeline[:lines]
        named = members[0] if len(members) == 1 else f"{members[0]} and {len(members) - 1} more"
        out += ["", f"{named} ({tz}): first {len(shown)} of {len(timeline)} ledger rows"]
        if len(members) > 1:
            others = ", ".join(members[1:4]) + (", ..." if len(members) > 4 else "")
            out.append(f"  (the same for {others})")
        for row in shown:
            outcome = label((row.status, row.reason))
            if row.deferred is not None:
                outcome += f" (deferred first: {row.deferred})"
            if row.variant is not None:
                outcome += f" [variant {row.variant}]"
            if row.extra is not None:
                outcome = f"extra {row.extra}: {outcome}"
            out.append(f"  {local(row.at, tz)}  {row.plan:<{width}}  step {row.step:>3}  {outcome}")
    return "\n".join(out + render_left(report) + render_engagement(report))


def render_guard(report: Report) -> list[str]:
    """The simulated users' reactions and what the engagement guard did about them (nothing
    without `--opens`/`--cancels` and no pause)."""
    if report.behaviour is None and not report.pauses:
        return []
    out = [""]
    if (b := report.behaviour) is not None:
        out.append(
            f"simulated users (seed {b.seed}): opens {b.opens.describe()}; "
            f"cancellations {b.cancels.describe()}"
        )
        width = max((len(p) for p in report.counts), default=0)
        for plan_id in sorted(report.counts):
            got = report.reacted.get(plan_id, Counter())
            out.append(
                f"  {plan_id:<{width}}  {got['open']:,} opens reported, {got['cancel']:,} "
                "switched the template off in the settings"
            )
    paused = ", ".join(sorted({p.plan for p in report.pauses}))
    out.append(
        f"engagement guard ({report.checks:,} checks, one at every moment): "
        + (f"paused {paused}" if paused else "no plan paused")
    )
    zone = next(iter(report.zones.values()), "UTC")
    for pause in report.pauses:
        out += [
            f"  {pause.plan} PAUSED at {local(pause.at, zone)} (rule {pause.rule}):",
            f"    {pause.reason}",
        ]
        if pause.held_back:
            users = f"{pause.held_users:,} enrolment{'s' if pause.held_users != 1 else ''}"
            out.append(
                f"    held back until the end: {_span(pause.held_steps)} of {users}, "
                f"{pause.held_back:,} in all (not in the ledger: a resume records them "
                "skipped:paused, or catches up)"
            )
        else:
            out.append("    held back until the end: nothing (no step fell due after it)")
    return out


def _span(steps: Sequence[int]) -> str:
    """(7, 8, 9) -> "steps 7-9"; (3,) -> "step 3"; (2, 5) -> "steps 2, 5"."""
    if len(steps) == 1:
        return f"step {steps[0]}"
    if list(steps) == list(range(steps[0], steps[-1] + 1)):
        return f"steps {steps[0]}-{steps[-1]}"
    return "steps " + ", ".join(map(str, steps))


def render_engagement(report: Report) -> list[str]:
    """Each plan's engagement report by step, as `reminders report PLAN` prints it (`--report`)."""
    out = []
    for _, found in sorted(report.engagement.items()):
        out += ["", engagement.render(found, "table")]
    return out


def _runway_text(way: Runway, tz: str) -> tuple[str, ...]:
    if way.dry_step is None:
        return ("covers every step",)
    steps = "1 step" if way.covered == 1 else f"{way.covered} steps"
    text = (f"covers {steps} from the start; step {way.dry_step} is not covered",)
    if way.warned_at is None or way.warned_due is None:
        return text
    return (
        *text,
        f"warned {local(way.warned_at, tz)}: step {way.warned_step} "
        f"({local(way.warned_due, tz)}) will be skipped no_consent, ask again",
    )


def render_left(report: Report) -> list[str]:
    """The rows still pending or deferred after the last retry (none, normally)."""
    if not report.left:
        return []
    return [
        "",
        f"rows still pending or deferred after the last retry: {len(report.left)}",
        *(
            f"  {r['plan_id']} {r['user_id']} due {r['due_at']:%Y-%m-%d %H:%M} UTC: {r['status']}"
            f" ({r['reason']}) until {r['defer_until']:%Y-%m-%d %H:%M} UTC"
            for r in report.left
        ),
    ]


def as_json(report: Report) -> dict[str, Any]:
    """The machine-readable report (`reminders simulate --json`), times in UTC."""

    def when(moment: datetime | None) -> str | None:
        return None if moment is None else moment.astimezone(UTC).isoformat()

    return {
        "start": when(report.start),
        "end": when(report.end),
        "users": [{"id": u, "tz": tz} for u, tz in report.zones.items()],
        "counts": {
            p: {label(k): n for k, n in sorted(c.items())} for p, c in report.counts.items()
        },
        "deferred_then_sent": {p: c[("sent", None)] for p, c in report.deferred_fate.items()},
        "runway": [
            {
                "plan": plan_id,
                "user": user,
                "covered": way.covered,
                "dry_step": way.dry_step,
                "warned_at": when(way.warned_at),
                "warned_step": way.warned_step,
                "warned_due": when(way.warned_due),
            }
            for (plan_id, user), way in sorted(report.runway.items())
        ],
        "timeline": {
            user: [
                {
                    "at": when(row.at),
                    "plan": row.plan,
                    "step": row.step,
                    "outcome": row.status,
                    "reason": row.reason,
                    "deferred": row.deferred,
                    "variant": row.variant,
                    "extra": row.extra,
                }
                for row in rows
            ]
            for user, rows in report.timeline.items()
        },
        "left": len(report.left),
        **_behaviour_json(report),
        "seconds": round(report.seconds, 2),
    }


def _behaviour_json(report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if (b := report.behaviour) is not None:

        def rates(r: Rates) -> dict[str, Any]:
            return {
                "plans": {p: float(v) for p, v in sorted(r.plans.items())},
                "steps": [
                    {"plan": p, "step": n, "rate": float(v)}
                    for (p, n), v in sorted(r.steps.items())
                ],
            }

        out["behaviour"] = {
            "seed": b.seed,
            "opens": rates(b.opens),
            "cancels": rates(b.cancels),
            "reported": {p: dict(c) for p, c in sorted(report.reacted.items())},
        }
    if report.behaviour is not None or report.pauses:
        out["guard"] = {
            "checks": report.checks,
            "pauses": [
                {
                    "plan": p.plan,
                    "at": p.at.astimezone(UTC).isoformat(),
                    "rule": p.rule,
                    "reason": p.reason,
                    "details": p.details,
                    "held_back": p.held_back,
                    "held_steps": list(p.held_steps),
                    "held_users": p.held_users,
                }
                for p in report.pauses
            ],
        }
    if report.engagement:
        out["engagement"] = report.engagement
    return out
