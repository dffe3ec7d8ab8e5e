"""Consent, enrolments, opens, WeChat's delivery results and its pushes' signed queries in
PostgreSQL (asyncpg).

The accounting rules are `scheduler.domain.consent`; this module keeps their history and cache:
every change is appended to `consent_events` and applied to the `consent` cache in the same
transaction, under the cache row's lock, so the history's order is the order the cache saw.
`recompute` rebuilds the cache from the history alone.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from scheduler.domain import consent as rules
from scheduler.domain.consent import ConsentEvent, ConsentState, Result, Via
from scheduler.domain.enrolment import Enrolment
from scheduler.domain.plan import ConsentKind, Plan
from scheduler.domain.schedule import calendar_anchor, calendar_occurrences, relative_due
from scheduler.errors import StoreError
from scheduler.store.conn import Conn

log = logging.getLogger(__name__)

PAIR_WINDOW = timedelta(minutes=5)
RUNWAY_LOOKAHEAD = 1000  # steps looked at per enrolment at most (a runway longer is "long")


_COPY_FROM = 1000  # enrolments at once: from here COPY beats arrays
_ENROLMENT_ARRAYS = (
    "unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[],"
    " $6::timestamptz[]) AS enrol_import (plan_id, user_id, start_at, tz, vars, next_due_at)"
)
_UPSERT_ENROLMENTS = (
    "INSERT INTO enrollments (plan_id, user_id, start_at, tz, vars, next_due_at)"
    " SELECT DISTINCT ON (plan_id, user_id)"
    "  plan_id, user_id, start_at, tz, vars::jsonb, next_due_at FROM {source}"
    " ON CONFLICT (plan_id, user_id) DO UPDATE SET start_at = excluded.start_at,"
    "  tz = excluded.tz, vars = excluded.vars, next_due_at = excluded.next_due_at,"
    "  next_step = 0, status = 'active', updated_at = now()"
)


@dataclass(frozen=True, slots=True)
class ConsentReport:
    """One reported consent change, as it is appended to the history."""

    user_id: str
    template_id: str
    result: Result
    source: str  # who reported it: 'api:<token name>', 'wechat:callback', 'cli', ...
    kind: ConsentKind | None = None
    via: Via = Via.POPUP
    occurred_at: datetime | None = None
    event_id: str | None = None
    raw: dict[str, Any] | None = None

    @property
    def from_wechat(self) -> bool:
        return self.source.startswith("wechat:")


@dataclass(frozen=True, slots=True)
class Recorded:
    appended: int
    duplicates: int  # already in the history (same event id): applied once
    corroborating: int  # second reports of a popup choice already counted
    states: dict[tuple[str, str], ConsentState]


@dataclass(frozen=True, slots=True)
class UserRunway:
    user_id: str
    credits: int
    long_term: bool
    banned: bool
    covered: int | None  # upcoming steps its consent covers (None: all)
    dry_step: int | None  # the first step that will be skipped with no_consent
    dry_at: datetime | None


@dataclass(frozen=True, slots=True)
class RunwayReport:
    """How far each enrolment's consent carries it (see `scheduler.domain.consent.runway`)."""

    plan_id: str
    template_id: str
    consent_kind: str
    as_of: datetime
    enrolled: int  # active enrolments
    covered_to_end: int  # whose consent covers every remaining step
    dry_next: int  # whose very next step will be skipped with no_consent
    dry_next_users: list[str]  # those users, soonest first (up to the report's limit)
    runs_dry: list[UserRunway]  # every enrolment that will run dry, soonest first (limited)
    runs_dry_total: int
    by_steps_covered: dict[int, int] = field(default_factory=dict)  # among those running dry

    def as_json(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id,
            "template_id": self.template_id,
            "consent_kind": self.consent_kind,
            "as_of": self.as_of.isoformat(),
            "enrolled": self.enrolled,
            "covered_to_end": self.covered_to_end,
            "dry_next": self.dry_next,
            "dry_next_users": self.dry_next_users,
            "runs_dry_total": self.runs_dry_total,
            "by_steps_covered": {str(k): v for k, v in sorted(self.by_steps_covered.items())},
            "runs_dry": [
                {
                    "openid": u.user_id,
                    "credits": u.credits,
                    "long_term": u.long_term,
                    "banned": u.banned,
                    "steps_covered": u.covered,
                    "dry_step": u.dry_step,
                    "dry_at": u.dry_at.isoformat() if u.dry_at else None,
                }
                for u in self.runs_dry
            ],
        }


@dataclass(frozen=True, slots=True)
class OpenReport:
    user_id: str
    scene: int
    opened_at: datetime
    delivery_id: int | None
    source: str


@dataclass(frozen=True, slots=True)
class SentResult:
    msgid: int
    errcode: int
    status: str | None
    openid: str  # the event's FromUserName
    template_id: str


def _state(row: Any) -> ConsentState:
    if row is None:
        return rules.NONE
    return ConsentState(row["credits"], row["long_term"], row["banned"])


def _event(row: Any) -> ConsentEvent:
    return ConsentEvent(
        Result(row["result"]),
        Via(row["via"]),
        ConsentKind(row["kind"]) if row["kind"] else None,
        corroborates=row["corroborates"] is not None,
    )


class ConsentStore:
    def __init__(self, pool: asyncpg.Pool, *, pair_window: timedelta = PAIR_WINDOW):
        self.pool = pool
        self.pair_window = pair_window

    # --- what plans declare ---------------------------------------------------------------------

    async def template_kinds(self) -> dict[str, set[ConsentKind]]:
        """Every template a loaded plan uses, with the consent kind(s) its plans declare."""
        rows = await self.pool.fetch(
            "SELECT DISTINCT v.definition->'template'->>'id' AS template_id,"
            " v.definition->>'consent' AS kind"
            " FROM plans p JOIN plan_versions v"
            "  ON v.plan_id = p.id AND v.version = p.current_version"
        )
        kinds: dict[str, set[ConsentKind]] = defaultdict(set)
        for r in rows:
            kinds[r["template_id"]].add(ConsentKind(r["kind"]))
        return dict(kinds)

    # --- recording ------------------------------------------------------------------------------

    async def record(self, reports: Sequence[ConsentReport]) -> Recorded:
        """Append the reports to the history and apply them to the cache, all or nothing.

        A report whose event id is already in the history is a duplicate and changes nothing.
        An `accept` in the popup reported by one side (the backend, WeChat) within the pair window
        of an uncorroborated `accept` reported by the other side is the same tap: it is kept as a
        corroboration and grants nothing more.
        """
        keys = sorted({(r.user_id, r.template_id) for r in reports})
        users, templates = [k[0] for k in keys], [k[1] for k in keys]
        appended = duplicates = corroborating = 0
        async with self.pool.acquire() as conn, conn.transaction():
            # Lock the cache rows first, in a fixed order: the history's ids then follow the
            # order in which changes are applied.
            await conn.execute(
                "INSERT INTO consent (user_id, template_id)"
                " SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
                users,
                templates,
            )
            rows = await conn.fetch(
                "SELECT c.user_id, c.template_id, c.credits, c.long_term, c.banned"
                " FROM consent c JOIN unnest($1::text[], $2::text[]) AS k (u, t)"
                "  ON c.user_id = k.u AND c.template_id = k.t"
                " ORDER BY c.user_id, c.template_id FOR UPDATE OF c",
                users,
                templates,
            )
            states = {(r["user_id"], r["template_id"]): _state(r) for r in rows}
            for report in reports:
                key = (report.user_id, report.template_id)
                when = report.occurred_at or datetime.now(UTC)
                paired = None
                if report.result == Result.ACCEPT and report.via == Via.POPUP:
                    paired = await self._unpaired_accept(conn, report, when)
                event_pk = await conn.fetchval(
                    "INSERT INTO consent_events (user_id, template_id, kind, result, via, source,"
                    " occurred_at, event_id, raw, corroborates)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                    " ON CONFLICT DO NOTHING RETURNING id",
                    report.user_id,
                    report.template_id,
                    report.kind.value if report.kind else None,
                    report.result.value,
                    report.via.value,
                    report.source,
                    when,
                    report.event_id,
                    report.raw,
                    paired,
                )
                if event_pk is None:
                    duplicates += 1
                    continue
                appended += 1
                corroborating += paired is not None
                states[key] = rules.apply(
                    states[key],
                    ConsentEvent(report.result, report.via, report.kind, paired is not None),
                )
            await self._write_cache(conn, states)
        return Recorded(appended, duplicates, corroborating, states)

    async def _unpaired_accept(
        self, conn: Conn, report: ConsentReport, when: datetime
    ) -> int | None:
        event_pk: int | None = await conn.fetchval(
            "SELECT e.id FROM consent_events e"
            " WHERE e.user_id = $1 AND e.template_id = $2 AND e.result = 'accept'"
            "  AND e.via = 'popup' AND e.corroborates IS NULL"
            "  AND (e.source LIKE 'wechat:%') <> $3"
            "  AND e.occurred_at BETWEEN $4::timestamptz - $5::interval"
            "   AND $4::timestamptz + $5::interval"
            "  AND NOT EXISTS (SELECT 1 FROM consent_events x WHERE x.corroborates = e.id)"
            " ORDER BY abs(extract(epoch FROM e.occurred_at - $4::timestamptz)), e.id LIMIT 1",
            report.user_id,
            report.template_id,
            report.from_wechat,
            when,
            self.pair_window,
        )
        return event_pk

    @staticmethod
    async def _write_cache(conn: Conn, states: dict[tuple[str, str], ConsentState]) -> None:
        items = list(states.items())
        await conn.execute(
            "INSERT INTO consent AS c (user_id, template_id, credits, long_term, banned)"
            " SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bool[], $5::bool[])"
            " ON CONFLICT (user_id, template_id) DO UPDATE SET credits = excluded.credits,"
            "  long_term = excluded.long_term, banned = excluded.banned, updated_at = now()"
            " WHERE (c.credits, c.long_term, c.banned)"
            "  IS DISTINCT FROM (excluded.credits, excluded.long_term, excluded.banned)",
            [k[0] for k, _ in items],
            [k[1] for k, _ in items],
            [s.credits for _, s in items],
            [s.long_term for _, s in items],
            [s.banned for _, s in items],
        )

    # --- reading --------------------------------------------------------------------------------

    async def state(self, user_id: str, template_id: str) -> ConsentState:
        row = await self.pool.fetchrow(
            "SELECT credits, long_term, banned FROM consent"
            " WHERE user_id = $1 AND template_id = $2",
            user_id,
            template_id,
        )
        return _state(row)

    async def states(self, user_id: str) -> dict[str, ConsentState]:
        rows = await self.pool.fetch(
            "SELECT template_id, credits, long_term, banned FROM consent WHERE user_id = $1"
            " ORDER BY template_id",
            user_id,
        )
        return {r["template_id"]: _state(r) for r in rows}

    async def history(self, user_id: str, template_id: str | None = None) -> list[dict[str, Any]]:
        """The user's consent history, oldest first: what happened, who said so, and when."""
        rows = await self.pool.fetch(
            "SELECT id, template_id, kind, result, via, source, occurred_at, recorded_at,"
            " event_id, delivery_id, corroborates, raw FROM consent_events"
            " WHERE user_id = $1 AND ($2::text IS NULL OR template_id = $2) ORDER BY id",
            user_id,
            template_id,
        )
        return [dict(r) for r in rows]

    # --- deriving -------------------------------------------------------------------------------

    async def derived(
        self, user_id: str | None = None, template_id: str | None = None
    ) -> dict[tuple[str, str], ConsentState]:
        """The state the history implies, per (user, template), without reading the cache."""
        grouped: dict[tuple[str, str], list[ConsentEvent]] = defaultdict(list)
        async with self.pool.acquire() as conn, conn.transaction():
            async for r in conn.cursor(
                "SELECT user_id, template_id, kind, result, via, corroborates FROM consent_events"
                " WHERE ($1::text IS NULL OR user_id = $1)"
                "  AND ($2::text IS NULL OR template_id = $2)"
                " ORDER BY user_id, template_id, id",
                user_id,
                template_id,
            ):
                grouped[(r["user_id"], r["template_id"])].append(_event(r))
        return {key: rules.derive(events) for key, events in grouped.items()}

    async def mismatches(
        self, user_id: str | None = None, template_id: str | None = None
    ) -> dict[tuple[str, str], tuple[ConsentState, ConsentState]]:
        """(cached, derived) for every key where the cache disagrees with the history."""
        derived = await self.derived(user_id, template_id)
        rows = await self.pool.fetch(
            "SELECT user_id, template_id, credits, long_term, banned FROM consent"
            " WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR template_id = $2)",
            user_id,
            template_id,
        )
        cached = {(r["user_id"], r["template_id"]): _state(r) for r in rows}
        out = {}
        for key in cached.keys() | derived.keys():
            have, want = cached.get(key, rules.NONE), derived.get(key, rules.NONE)
            if have != want:
                out[key] = (have, want)
        return out

    async def recompute(self, user_id: str | None = None, template_id: str | None = None) -> int:
        """Rebuild the cache from the history; returns how many entries it corrected."""
        wrong = await self.mismatches(user_id, template_id)
        if wrong:
            async with self.pool.acquire() as conn, conn.transaction():
                await self._write_cache(conn, {k: v[1] for k, v in wrong.items()})
            log.warning("consent cache corrected from history for %d entries", len(wrong))
        return len(wrong)

    # --- enrolments -----------------------------------------------------------------------------

    async def upsert_enrollments(self, enrolments: Sequence[Enrolment]) -> int:
        """Enrol (or restart from `start_at`) users: the one writer of enrolments. Large
        batches go through COPY into a temporary table, small ones as arrays; one upsert."""
        if not enrolments:
            return 0
        records = [
            (e.plan_id, e.user_id, e.start_at, e.tz, json.dumps(e.variables), e.next_due_at)
            for e in enrolments
        ]
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                if len(records) >= _COPY_FROM:
                    await conn.execute(
                        "CREATE TEMPORARY TABLE enrol_import (plan_id text, user_id text,"
                        " start_at timestamptz, tz text, vars text, next_due_at timestamptz)"
                        " ON COMMIT DROP"
                    )
                    await conn.copy_records_to_table("enrol_import", records=records)
                    status = await conn.execute(_UPSERT_ENROLMENTS.format(source="enrol_import"))
                else:
                    status = await conn.execute(
                        _UPSERT_ENROLMENTS.format(source=_ENROLMENT_ARRAYS),
                        *(list(column) for column in zip(*records, strict=True)),
                    )
        except asyncpg.ForeignKeyViolationError:
            plans = ", ".join(repr(p) for p in sorted({e.plan_id for e in enrolments}))
            what = f"no plan {plans} is" if "," not in plans else f"not every plan of {plans} is"
            raise StoreError(f"{what} loaded; start the daemon on its file first") from None
        return int(status.split()[-1])

    # --- the runway -----------------------------------------------------------------------------

    async def runway(
        self, plan_id: str, *, now: datetime | None = None, limit: int = 100
    ) -> RunwayReport | None:
        """Per active enrolment, how many upcoming steps its consent covers; None: no plan."""
        now = now or datetime.now(UTC)
        record = await self.pool.fetchrow(
            "SELECT p.registered_at, v.definition FROM plans p"
            " JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
            " WHERE p.id = $1",
            plan_id,
        )
        if record is None:
            return None
        plan = Plan.model_validate(record["definition"])
        rows = await self.pool.fetch(
            "SELECT e.user_id, e.tz, e.start_at, e.next_step, e.next_due_at,"
            " coalesce(c.credits, 0) AS credits, coalesce(c.long_term, false) AS long_term,"
            " coalesce(c.banned, false) AS banned"
            " FROM enrollments e LEFT JOIN consent c"
            "  ON c.user_id = e.user_id AND c.template_id = $2"
            " WHERE e.plan_id = $1 AND e.status = 'active'",
            plan_id,
            plan.template.id,
        )
        upcoming_calendar: list[tuple[int, datetime]] = []
        cal = plan.schedule.calendar
        if cal is not None:
            budget = min(max((r["credits"] for r in rows), default=0) + 1, RUNWAY_LOOKAHEAD)
            occurrences = calendar_occurrences(cal, calendar_anchor(cal, record["registered_at"]))
            upcoming_calendar = [
                (o.step, o.due_at)
                for o in itertools.islice((o for o in occurrences if o.due_at > now), budget)
            ]

        def upcoming(r: Any) -> Iterator[tuple[int, datetime]]:
            if cal is not None:
                return iter(upcoming_calendar)
            return _relative_steps(plan, r)

        results = []
        for r in rows:
            state = ConsentState(r["credits"], r["long_term"], r["banned"])
            way = rules.runway(state, plan.consent, itertools.islice(upcoming(r), RUNWAY_LOOKAHEAD))
            results.append(
                UserRunway(
                    r["user_id"],
                    r["credits"],
                    r["long_term"],
                    r["banned"],
                    way.covered,
                    way.dry_step,
                    way.dry_at,
                )
            )
        dry = sorted(
            (u for u in results if u.dry_step is not None),
            key=lambda u: (u.dry_at, u.user_id),
        )
        dry_next = [u for u in dry if u.covered == 0]
        by_covered: dict[int, int] = defaultdict(int)
        for u in dry:
            by_covered[u.covered or 0] += 1
        return RunwayReport(
            plan_id=plan_id,
            template_id=plan.template.id,
            consent_kind=plan.consent.value,
            as_of=now,
            enrolled=len(rows),
            covered_to_end=len(results) - len(dry),
            dry_next=len(dry_next),
            dry_next_users=[u.user_id for u in dry_next[:limit]],
            runs_dry=dry[:limit],
            runs_dry_total=len(dry),
            by_steps_covered=dict(by_covered),
        )

    # --- opens and WeChat's delivery results ----------------------------------------------------

    async def deliveries_of(self, ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """delivery id -> (user, plan) for those that exist."""
        rows = await self.pool.fetch(
            "SELECT id, user_id, plan_id FROM deliveries WHERE id = ANY ($1::bigint[])", list(ids)
        )
        return {r["id"]: (r["user_id"], r["plan_id"]) for r in rows}

    async def record_opens(self, opens: Sequence[OpenReport]) -> tuple[int, int]:
        """Record opens (each once); returns (recorded, duplicates)."""
        plans = await self.deliveries_of([o.delivery_id for o in opens if o.delivery_id])
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "INSERT INTO opens (user_id, delivery_id, plan_id, scene, opened_at, source)"
                " SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::int[],"
                "  $5::timestamptz[], $6::text[])"
                " ON CONFLICT DO NOTHING RETURNING id",
                [o.user_id for o in opens],
                [o.delivery_id for o in opens],
                [plans[o.delivery_id][1] if o.delivery_id else None for o in opens],
                [o.scene for o in opens],
                [o.opened_at for o in opens],
                [o.source for o in opens],
            )
        return len(rows), len(opens) - len(rows)

    async def apply_sent_results(self, results: Sequence[SentResult]) -> int:
        """WeChat's final result of sends (subscribe_msg_sent_event), applied once, and only
        to the delivery whose msgid, user and template all match (a msgid alone is not proof).

        A send WeChat accepted but could not deliver (ErrorCode != 0) becomes `failed`
        (reason `push_failed`). Returns how many deliveries matched.
        """
        if not results:
            return 0
        status = await self.pool.execute(
            "UPDATE deliveries d SET push_errcode = r.code, push_status = r.status,"
            " pushed_at = now(),"
            " status = CASE WHEN r.code <> 0 AND d.status = 'sent' THEN 'failed' ELSE d.status END,"
            " reason = CASE WHEN r.code <> 0 AND d.status = 'sent' THEN 'push_failed'"
            "  ELSE d.reason END,"
            " errcode = CASE WHEN r.code <> 0 AND d.status = 'sent' THEN r.code ELSE d.errcode END"
            " FROM unnest($1::bigint[], $2::int[], $3::text[], $4::text[], $5::text[])"
            "  AS r (msgid, code, status, openid, template), plan_versions v"
            " WHERE d.msgid = r.msgid AND d.pushed_at IS NULL AND d.user_id = r.openid"
            "  AND v.plan_id = d.plan_id AND v.version = d.plan_version"
            "  AND v.definition -> 'template' ->> 'id' = r.template",
            [r.msgid for r in results],
            [r.errcode for r in results],
            [r.status for r in results],
            [r.openid for r in results],
            [r.template_id for r in results],
        )
        return int(status.split()[-1])

    # --- WeChat's pushes: each signed query once ------------------------------------------------

    async def first_use(self, timestamp: int, nonce: str, signature: str, keep_s: float) -> bool:
        """Record a push's signed (timestamp, nonce, signature); False if any replica already
        had it. Rows older than `keep_s` (past the freshness window) are pruned on the way."""
        return (
            await self.pool.fetchval(
                "WITH pruned AS (DELETE FROM push_replay"
                "  WHERE received_at < now() - make_interval(secs => $4))"
                " INSERT INTO push_replay (timestamp, nonce, signature) VALUES ($1, $2, $3)"
                " ON CONFLICT DO NOTHING RETURNING true",
                timestamp,
                nonce,
                signature,
                keep_s,
            )
            is True
        )

    async def forget_use(self, timestamp: int, nonce: str, signature: str) -> None:
        """Undo `first_use` for a push that could not be applied, so WeChat's retry is not
        taken for a replay."""
        await self.pool.execute(
            "DELETE FROM push_replay WHERE timestamp = $1 AND nonce = $2 AND signature = $3",
            timestamp,
            nonce,
            signature,
        )


def _relative_steps(plan: Plan, r: Any) -> Iterator[tuple[int, datetime]]:
    rule = plan.schedule.relative
    assert rule is not None
    tz = ZoneInfo(r["tz"])
    index = r["next_step"]
    while (due := relative_due(rule, r["start_at"], tz, index)) is not None:
        yield index + 1, due
        index += 1


async def runway(store_pool: asyncpg.Pool, plan_id: str, **kw: Any) -> RunwayReport | None:
    """The consent runway of a plan (for `reminders status` and the API); None: no such plan."""
    return await ConsentStore(store_pool).runway(plan_id, **kw)
