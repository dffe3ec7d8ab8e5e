"""Plans in virtual time through the real gate: `reminders simulate`, and bench/twelve_weeks.py.

The real `Dispatcher` and `Store` run against the fake WeChat on loopback, on a database of their
own; only the clock is virtual. Time moves from event to event, never sleeping: each calendar
occurrence fires at its time, relative plans are swept at each enrolment's next due time, and at
every moment the deferred sends whose time has come are taken through the gate again (before that
moment's fires). After the window only deferred sends are driven on, until none is left.

After every moment the consent runway (`ConsentStore.runway`, as `/v1/plans/{id}/runway` reports
it) is read: the first moment it says a user's very next step is not covered is the warning the
mini program would have had to ask again.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from scheduler.app.dispatcher import Dispatcher
from scheduler.app.lifecycle import Lifecycle
from scheduler.channels.base import OutgoingMessage, SendResult
from scheduler.channels.wechat import WeChatChannel
from scheduler.domain.consent import Result
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
from scheduler.store.consent import RUNWAY_LOOKAHEAD, ConsentReport
from scheduler.store.embedded import temporary_embedded
from scheduler.store.postgres import Store
from scheduler.store.scratch import scratch_database
from scheduler.testing.fake_wechat import FakeWeChat

T = TypeVar("T")
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


class RecordingChannel:
    """The real WeChat channel, noting the virtual time of every accepted send."""

    def __init__(self, channel: WeChatChannel, clock: Clock):
        self.channel = channel
        self.clock = clock
        self.sends: list[Send] = []

    async def send(self, message: OutgoingMessage) -> SendResult:
        result = await self.channel.send(message)
        if result.outcome == Outcome.SENT:
            self.sends.append(Send(message.touser, message.template_id, self.clock()))
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
) -> Report:
    """Run `loaded` for `users` over [start, end) on the empty database at `url` (migrated here).

    `opt_outs` are (when, user, reason): an opt-out of every plan, applied at the first moment at
    or after `when`. `activity` is what the users are reported doing (`simulated_activity`),
    stored up front: adapt rules count each report from its time on.
    """
    started = time.perf_counter()
    plans = [item.plan for item in loaded]
    template_plan = {p.template.id: p.id for p in plans}
    report = Report(start, end, {u.id: u.tz for u in users})
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
            await _setup(store, loaded, users, start)
            if activity:
                await store.activity.record(activity)
            drive = _Drive(store, dispatcher, lifecycle, clock, report, users)
            await drive.run(plans, _calendar_events(plans, start, end), sorted(opt_outs))
            await _read_ledger(store, report, drive.deferred)
            report.sends = [(s.user_id, template_plan[s.template_id], s.at) for s in channel.sends]
        finally:
            await channel.aclose()
            await fake.stop()
    report.seconds = time.perf_counter() - started
    return report


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
            candidates += [t for t in (next_due, next_retry) if t is not None]
            if not candidates:
                break
            now = min(candidates)
            while opt_outs and opt_outs[0][0] <= now:
                at, user, reason = opt_outs.pop(0)
                clock.now = at
                await self.lifecycle.opt_out(user, plan_id=None, actor="simulate", reason=reason)
            clock.now = now
            report.steps += 1
            # Deferred sends whose moment has come first, then the fires due now, then the sweep.
            for plan_id in sorted(await store.plans_with_due_deferrals(now)):
                await self.dispatcher.retry_deferred(plan_id)
                report.retries += 1
            if i < len(fire_times) and fire_times[i] == now:
                for plan_id in events[now]:
                    await self.dispatcher.fire(plan_id, now)
                    report.fires += 1
                i += 1
            if next_due is not None and next_due == now:
                for plan_id in relative:
                    await self.dispatcher.fire(plan_id, now)
                    report.sweeps += 1
            for row in await store.simulation.deferred():
                first = self.deferred.get(row["id"], (row["reason"], now))[0]
                self.deferred[row["id"]] = (first, row["defer_until"])
            await self._read_runway(plans)
            prev = now

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
    return "\n".join(out + render_left(report))


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
        "seconds": round(report.seconds, 2),
    }
