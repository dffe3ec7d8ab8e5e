"""Twelve virtual weeks of the example plans through the real gate, and the ledger's count per rule.

    .venv/bin/python bench/twelve_weeks.py            # a throwaway embedded PostgreSQL
    DATABASE_URL=postgresql://... .venv/bin/python bench/twelve_weeks.py   # a scratch database

Every plan in plans/ runs from 2026-12-01 00:00 (Asia/Shanghai) for 12 weeks under
plans/policy.yaml, with the real `Dispatcher` and `Store` against an in-process fake WeChat; only
the clock is virtual. Time moves from event to event: each calendar occurrence fires at its time,
the relative plan (rehab-weekly) is swept at each enrolment's next due time, and at every step the
deferred sends whose moment has come are taken through the gate again (`retry_deferred`), before
the fires of that moment. After the 12 weeks only the deferred sends are driven on, until none is
left to retry.

The audience (`AUDIENCE`) is eight users chosen so that every rule the example plans can meet
stops something: the daily cap of 2 across plans, quiet hours in New York and London (deferred,
then sent), one-time credits running out, a missing long-term consent, an opt-out, and enrolment
variables that break a content rule and a template field rule. The example plans cannot reach the
per-category weekly caps (policy.yaml's exceptions fit their schedules exactly), have no per-plan
caps and no finance plan (no limit key), and their quiet-hours waits (at most 10 h) are all within
max_delay (12 h): those rules stop nothing here (tests/unit and tests/integration cover them).

Rows still pending or deferred at the end are listed. As the scheduler stands, the deferred sends
of a calendar plan's last occurrence stay deferred for good: that fan-out marks the plan
`completed`, and `retry_deferred` (and the claim) only take an active plan's rows.

The last line is machine-readable:

    weeks=12 sent=N skipped_capped=N skipped_quiet_hours=N deferred_then_sent=N no_consent=N ...
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.app.dispatcher import Dispatcher  # noqa: E402
from scheduler.app.lifecycle import Lifecycle  # noqa: E402
from scheduler.channels.base import OutgoingMessage, SendResult  # noqa: E402
from scheduler.channels.wechat import WeChatChannel  # noqa: E402
from scheduler.domain.consent import Result  # noqa: E402
from scheduler.domain.outcomes import Outcome  # noqa: E402
from scheduler.domain.plan import ConsentKind, Plan  # noqa: E402
from scheduler.domain.schedule import calendar_anchor, calendar_occurrences, relative_due  # noqa: E402
from scheduler.fake_wechat import FakeWeChat  # noqa: E402
from scheduler.planfiles import load_plans, load_policy  # noqa: E402
from scheduler.store.consent import ConsentReport, ConsentStore  # noqa: E402
from scheduler.store.postgres import Store  # noqa: E402

SHANGHAI = ZoneInfo("Asia/Shanghai")
WEEKS = 12
START = datetime(2026, 12, 1, tzinfo=SHANGHAI).astimezone(UTC)
END = START + timedelta(weeks=WEEKS)  # exclusive: 2027-02-23 00:00 Shanghai
PLANS_DIR = Path(__file__).resolve().parents[1] / "plans"
# 21 characters: over the 20 a `thing` field allows (rehab-weekly's thing1 is "{patient}").
LONG_PATIENT = "欧阳娜娜（北京协和医院骨科三病区第十二床）"


# --- the audience -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One user's enrolment in one plan, with the consent they gave for its template."""

    plan: str
    credits: int | None = None  # one-time plans: credits granted; None: none at all
    long_term: bool = True  # long-term plans: whether the user accepted the template
    variables: dict[str, str] = field(default_factory=dict)
    start: datetime | None = None  # relative plans: the enrolment's start (e.g. surgery)


@dataclass(frozen=True)
class User:
    id: str
    tz: str
    plans: tuple[Member, ...]
    why: str


AUDIENCE: tuple[User, ...] = (
    User(
        "o-alice",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("course-fridays"),
        ),
        "three plans in Shanghai: on December weekdays commute 07:30 and practice 08:00 fill the "
        "day, so practice 20:00 (and course 19:00 on Fridays) is capped",
    ),
    User(
        "o-bob",
        "America/New_York",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("course-fridays"),
        ),
        "the same three plans from New York (13 h behind): practice 20:00 and course 19:00 "
        "(Shanghai) fall at 07:00 and 06:00 local, inside quiet hours: deferred to 08:00, sent",
    ),
    User(
        "o-carol",
        "Europe/London",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=60),
            Member("pension-monthly", variables={"name": "Carol Evans"}),
        ),
        "London (8 h behind): commute 07:30 is 23:30 local (transport quiet hours, deferred to "
        "06:00), practice 08:00 is midnight and pension 09:00 is 01:00 (deferred to 08:00)",
    ),
    User(
        "o-dave",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("practice-30days", credits=10),
            Member(
                "rehab-weekly",
                credits=4,
                variables={"patient": "王强", "hospital": "协和"},
                start=datetime(2026, 11, 30, 10, tzinfo=SHANGHAI),
            ),
        ),
        "one-time credits run out: 10 for practice, 4 for rehab (then no_consent); rehab on "
        "Mondays 09:00 is capped while commute and practice still take the day",
    ),
    User(
        "o-erin",
        "Asia/Shanghai",
        (
            Member(
                "rehab-weekly",
                credits=12,
                variables={"patient": LONG_PATIENT, "hospital": "协和"},
                start=datetime(2026, 11, 29, 10, tzinfo=SHANGHAI),
            ),
            Member("pension-monthly", variables={"name": "李娜"}),
        ),
        "a patient name of 21 characters in rehab's thing1 (at most 20): every step skipped by the "
        "field rule, no credit taken",
    ),
    User(
        "o-frank",
        "Asia/Shanghai",
        (
            Member("pension-monthly", variables={"name": "免费领红包"}),
            Member("commute-line2"),
        ),
        "a pension 'name' carrying promotional words (免费领, 红包): the long-term notice is "
        "skipped by the content rule",
    ),
    User(
        "o-grace",
        "Asia/Shanghai",
        (
            Member("commute-line2"),
            Member("course-fridays"),
            Member("pension-monthly", variables={"name": "赵敏"}),
        ),
        "opts out of every plan on 2026-12-24 12:00 Shanghai: later sends are skipped opted_out",
    ),
    User(
        "o-heidi",
        "America/New_York",
        (
            Member(
                "rehab-weekly",
                credits=12,
                variables={"patient": "Heidi Park", "hospital": "NYU Langone"},
                start=datetime(2026, 11, 30, 10, tzinfo=ZoneInfo("America/New_York")),
            ),
            Member("course-fridays", long_term=False),
            Member("pension-monthly", variables={"name": "Heidi Park"}),
        ),
        "rehab at 09:00 New York time (the user's own zone); never accepted the course's "
        "long-term template: no_consent every Friday",
    ),
)

# (when, user, reason): opt-outs of every plan, applied at the first step at or after `when`.
OPT_OUTS: tuple[tuple[datetime, str, str], ...] = (
    (datetime(2026, 12, 24, 12, tzinfo=SHANGHAI).astimezone(UTC), "o-grace", "asked to stop"),
)


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


@dataclass
class Report:
    """What the ledger says after the run, per plan and per user, and how the run went."""

    zones: dict[str, str]  # user -> IANA zone
    counts: dict[str, Counter[tuple[str, str | None]]] = field(default_factory=dict)
    # (user, plan) -> (status, reason) -> rows
    by_user: dict[tuple[str, str], Counter[tuple[str, str | None]]] = field(default_factory=dict)
    # plan -> the final (status, reason) of its rows that were deferred at some point
    deferred_fate: dict[str, Counter[tuple[str, str | None]]] = field(default_factory=dict)
    left: list[dict[str, Any]] = field(default_factory=list)  # rows pending or deferred at the end
    sends: list[tuple[str, str, datetime]] = field(default_factory=list)  # (user, plan, when)
    steps: int = 0  # distinct virtual moments the run stopped at
    fires: int = 0  # calendar fires
    sweeps: int = 0  # relative-plan sweeps
    retries: int = 0  # retry_deferred calls
    seconds: float = 0.0

    def total(self) -> Counter[tuple[str, str | None]]:
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
        await ConsentStore(store.pool).record(reports)


async def _setup(store: Store, plans: dict[str, Plan], loaded: Iterable[Any]) -> None:
    for item in loaded:
        plan = item.plan
        await store.register_plan(
            plan.id,
            "relative" if plan.is_relative else "calendar",
            item.content_hash,
            plan.model_dump(mode="json"),
            f"plans/{item.path.name}",
        )
    # The store stamps registered_at with the real clock; a calendar plan without a start date
    # counts its steps from it. Loaded at the run's start in virtual time, so the run does not
    # depend on the day it is run on.
    await store.pool.execute("UPDATE plans SET registered_at = $1", START)
    for user in AUDIENCE:
        for member in user.plans:
            plan = plans[member.plan]
            tz = ZoneInfo(user.tz)
            start = member.start or START
            rule = plan.schedule.relative
            due = relative_due(rule, start, tz, 0) if rule else None
            await store.enroll(plan.id, user.id, start, user.tz, member.variables, due)
            await _grant(store, user, plan, member)


async def _calendar_events(store: Store, plans: dict[str, Plan]) -> dict[datetime, list[str]]:
    """Every calendar occurrence in [START, END), by time, plans in id order."""
    events: dict[datetime, list[str]] = defaultdict(list)
    for plan in plans.values():
        cal = plan.schedule.calendar
        if cal is None:
            continue
        record = await store.plan(plan.id)
        assert record is not None
        for occurrence in calendar_occurrences(cal, calendar_anchor(cal, record.registered_at)):
            if occurrence.due_at >= END:
                break
            if occurrence.due_at >= START:
                events[occurrence.due_at].append(plan.id)
    return {t: sorted(ids) for t, ids in events.items()}


async def run_scenario(url: str) -> Report:
    """The 12 weeks on a migrated, empty database at `url`; the ledger's counts per plan."""
    started = time.perf_counter()
    loaded, problems = load_plans([PLANS_DIR])
    if problems:
        raise RuntimeError(f"the example plans do not load: {problems}")
    plans = {item.plan.id: item.plan for item in loaded}
    template_plan = {p.template.id: p.id for p in plans.values()}
    relative = sorted(p.id for p in plans.values() if p.is_relative)
    policy = load_policy(PLANS_DIR)

    async with Store.open(url) as store:
        await store.migrate()
        fake = FakeWeChat(keep_messages=False)
        await fake.start()
        clock = Clock(START)
        channel = RecordingChannel(
            WeChatChannel(base_url=fake.base_url, appid="sim", secret="sim", retries=1), clock
        )
        try:
            dispatcher = Dispatcher(
                store, channel, replica_id="twelve-weeks", clock=clock, policy=policy
            )
            lifecycle = Lifecycle(store, clock=clock)
            await _setup(store, plans, loaded)
            events = await _calendar_events(store, plans)
            report = Report({u.id: u.tz for u in AUDIENCE})
            await _drive(store, dispatcher, lifecycle, clock, events, relative, report)
            await _read_ledger(store, report)
            report.sends = [(s.user_id, template_plan[s.template_id], s.at) for s in channel.sends]
        finally:
            await channel.aclose()
            await fake.stop()
    report.seconds = time.perf_counter() - started
    return report


async def _drive(
    store: Store,
    dispatcher: Dispatcher,
    lifecycle: Lifecycle,
    clock: Clock,
    events: dict[datetime, list[str]],
    relative: list[str],
    report: Report,
) -> None:
    """Move the clock from moment to moment: the next calendar occurrence, the next relative due
    time (both before END), or the next deferred send's moment (any time)."""
    fire_times = sorted(events)
    opt_outs = sorted(OPT_OUTS)
    deferred_ids: dict[int, str] = {}  # every row ever seen deferred -> its plan
    prev = START - timedelta(microseconds=1)
    i = 0
    while True:
        candidates = []
        if i < len(fire_times):
            candidates.append(fire_times[i])
        next_due = await store.pool.fetchval(
            "SELECT min(next_due_at) FROM enrollments WHERE status = 'active'"
            " AND plan_id = ANY($1) AND next_due_at > $2 AND next_due_at < $3",
            relative,
            prev,
            END,
        )
        if next_due is not None:
            candidates.append(next_due)
        next_retry = await store.pool.fetchval(
            "SELECT min(defer_until) FROM deliveries WHERE status = 'deferred'"
            " AND defer_until > $1",
            prev,
        )
        if next_retry is not None:
            candidates.append(next_retry)
        if not candidates:
            break
        now = min(candidates)
        while opt_outs and opt_outs[0][0] <= now:
            at, user, reason = opt_outs.pop(0)
            clock.now = at
            await lifecycle.opt_out(user, plan_id=None, actor="token:ops", reason=reason)
        clock.now = now
        report.steps += 1
        # Deferred sends whose moment has come first, then the fires due now, then the sweep.
        for plan_id in sorted(await store.plans_with_due_deferrals(now)):
            await dispatcher.retry_deferred(plan_id)
            report.retries += 1
        if i < len(fire_times) and fire_times[i] == now:
            for plan_id in events[now]:
                await dispatcher.fire(plan_id, now)
                report.fires += 1
            i += 1
        if next_due is not None and next_due == now:
            for plan_id in relative:
                await dispatcher.fire(plan_id, now)
                report.sweeps += 1
        for row in await store.pool.fetch(
            "SELECT id, plan_id FROM deliveries WHERE status = 'deferred'"
        ):
            deferred_ids[row["id"]] = row["plan_id"]
        prev = now
    rows = await store.pool.fetch(
        "SELECT plan_id, status, reason FROM deliveries WHERE id = ANY($1)", list(deferred_ids)
    )
    for row in rows:
        report.deferred_fate.setdefault(row["plan_id"], Counter())[
            (row["status"], row["reason"])
        ] += 1


async def _read_ledger(store: Store, report: Report) -> None:
    for row in await store.pool.fetch(
        "SELECT plan_id, user_id, status, reason, count(*) AS n FROM deliveries"
        " GROUP BY plan_id, user_id, status, reason"
    ):
        key, n = (row["status"], row["reason"]), row["n"]
        report.counts.setdefault(row["plan_id"], Counter())[key] += n
        report.by_user.setdefault((row["user_id"], row["plan_id"]), Counter())[key] += n
    report.left = [
        dict(r)
        for r in await store.pool.fetch(
            "SELECT plan_id, user_id, occurrence, due_at, status, reason, defer_until"
            " FROM deliveries WHERE status IN ('pending', 'deferred') ORDER BY plan_id, user_id"
        )
    ]


# --- the report ---------------------------------------------------------------------------------


def _label(key: tuple[str, str | None]) -> str:
    status, reason = key
    return status if reason is None else f"{status}:{reason}"


def render_table(report: Report) -> str:
    total = report.total()
    keys = sorted(total, key=lambda k: (k[0] != "sent", k[0], k[1] or ""))
    columns = [_label(k) for k in keys] + ["deferred→sent"]
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

    out = [line(["plan", *columns]), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:-1]] + [line(["-" * w for w in widths]), line(rows[-1])]
    return "\n".join(out)


def summary_line(report: Report) -> str:
    total = report.total()
    known = {
        "sent": ("sent", None),
        "failed": ("failed", None),
        "skipped_capped": ("skipped", "capped"),
        "skipped_quiet_hours": ("skipped", "quiet_hours"),
        "skipped_content": ("skipped", "content"),
        "skipped_field": ("skipped", "field"),
        "skipped_category": ("skipped", "category"),
        "no_consent": ("skipped", "no_consent"),
        "opted_out": ("skipped", "opted_out"),
        "defer_expired": ("skipped", "defer_expired"),
        "deferred_left": ("deferred", "quiet_hours"),
    }
    parts = [f"weeks={WEEKS}"]
    for name, key in known.items():
        parts.append(f"{name}={total[key]}")
        if name == "skipped_quiet_hours":
            parts.append(f"deferred_then_sent={report.deferred_then('sent')}")
    others = sorted(set(total) - set(known.values()), key=lambda k: (k[0], k[1] or ""))
    parts += [f"{_label(k).replace(':', '_')}={total[k]}" for k in others]
    deferred_ever = sum(sum(c.values()) for c in report.deferred_fate.values())
    parts += [
        f"deferred_ever={deferred_ever}",
        f"deferred_then_capped={report.deferred_then('skipped', 'capped')}",
        f"rows={sum(total.values())}",
        f"max_per_user_day={report.most_per_local_day()}",
        f"steps={report.steps}",
        f"seconds={report.seconds:.1f}",
    ]
    return " ".join(parts)


def render(report: Report) -> str:
    lines = [
        f"{WEEKS} virtual weeks from {START.astimezone(SHANGHAI):%Y-%m-%d %H:%M} Asia/Shanghai: "
        f"{len(AUDIENCE)} users, {report.steps} steps ({report.fires} calendar fires, "
        f"{report.sweeps} sweeps, {report.retries} deferred retries), {report.seconds:.1f} s",
        "",
        "ledger rows per plan by (status:reason); deferred→sent: rows deferred at first that went "
        "out later",
        render_table(report),
    ]
    if report.left:
        lines += ["", f"rows still pending or deferred after the last retry: {len(report.left)}"]
        lines += [
            f"  {r['plan_id']} {r['user_id']} due {r['due_at']:%Y-%m-%d %H:%M} UTC: {r['status']}"
            f" ({r['reason']}) until {r['defer_until']:%Y-%m-%d %H:%M} UTC"
            for r in report.left
        ]
    lines += ["", f"most sends to one user on one local day: {report.most_per_local_day()}"]
    lines.append(summary_line(report))
    return "\n".join(lines)


# --- entry point --------------------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def _on_scratch_database(server_url: str) -> Report:
    """Run on a new database of `server_url`, dropped afterwards."""
    name = f"twelve_weeks_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    try:
        return await run_scenario(_with_database(server_url, name))
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


def main() -> None:
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")  # platformdirs, via pgserver
    if os.environ.get("DATABASE_URL"):
        print(render(asyncio.run(_on_scratch_database(os.environ["DATABASE_URL"]))))
        return
    import pgserver

    data_dir = Path(tempfile.mkdtemp(prefix="reminders-12w-"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server = pgserver.get_server(data_dir, cleanup_mode="stop")
        try:
            report = asyncio.run(_on_scratch_database(server.get_uri()))
        finally:
            server.cleanup()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    print(render(report))


if __name__ == "__main__":
    main()
