"""The PostgreSQL store (asyncpg): plans, enrolments, consent, the delivery ledger, replicas.

Every query that touches many users takes arrays and runs once per batch, never once per user.
asyncpg errors are translated into `StoreError` here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from importlib import resources
from typing import Any

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from scheduler.compact_json import encode as compact_json
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import Plan
from scheduler.domain.plan_state import SENDING_STATES, PlanState
from scheduler.errors import StoreError
from scheduler.planfiles import content_hash as plan_content_hash
from scheduler.store.abc import (
    ClusterGaugeReads,
    ControlNotifications,
    EngagementReads,
    SimulationReads,
    StatusReads,
)
from scheduler.store.activity import ActivityStore
from scheduler.store.conn import Conn
from scheduler.store.consent import ConsentStore
from scheduler.store.control import ControlChannel
from scheduler.store.engagement import EngagementStore
from scheduler.store.ledger import LedgerStore
from scheduler.store.lifecycle import LifecycleStore
from scheduler.store.metrics import MetricsStore
from scheduler.store.planfiles import PlanFilesStore
from scheduler.store.simulation import SimulationStore
from scheduler.store.status import StatusStore

log = logging.getLogger(__name__)

MIGRATIONS_LOCK = 72_410_001  # pg_advisory_xact_lock key: one replica migrates at a time
SCHEDULER_SETUP_LOCK = 72_410_002  # one replica at a time creates APScheduler's tables
CONTROL_CHANNEL = "reminders_control"  # NOTIFY channel every daemon replica LISTENs to


@dataclass(frozen=True)
class PlanRecord:
    id: str
    state: PlanState
    version: int
    content_hash: str
    definition: dict[str, Any]
    registered_at: datetime


@dataclass(frozen=True)
class Registration:
    record: PlanRecord
    changed: bool  # a new version was recorded by this call


@dataclass(frozen=True)
class Recipient:
    user_id: str
    tz: str
    vars: dict[str, Any]
    start_at: datetime
    next_step: int = 0
    next_due_at: datetime | None = None


@dataclass(frozen=True)
class DeferredDelivery:
    """A deferred ledger row whose moment has come, with what the gate needs to judge it again."""

    occurrence: str
    step: int
    due_at: datetime
    message: dict[str, Any]
    recipient: Recipient
    enrolled: bool  # False: the user's timeline was stopped meanwhile


@dataclass(frozen=True)
class Claim:
    """A ledger row a claim took: `pending` (send it now), or the gate's `skipped`/`deferred`
    outcome with its reason."""

    delivery_id: int
    user_id: str
    status: Outcome
    reason: Reason | None = None
    # Set by a caller whose batch holds more than one row of a user (a relative plan's step and
    # an adapt rule's extra step): which of the user's rows this claim is.
    occurrence: str | None = None

    @property
    def allowed(self) -> bool:
        return self.status == Outcome.PENDING


@dataclass(frozen=True)
class Stop:
    """A gate rule before the caps (category, content, fields, quiet hours) stopped a send."""

    status: Outcome  # skipped, deferred (or missed)
    reason: Reason
    detail: str
    defer_until: datetime | None = None


@dataclass(frozen=True)
class CapUse:
    """One frequency-cap counter a send would count."""

    key: str
    limit: int
    resets_at: datetime


@dataclass(frozen=True)
class Due:
    """One (occurrence, user) that is due, with its rendered message and what the rules before
    the caps said about it (`stop`), or the cap counters it would count: a row of a claim."""

    occurrence: str
    user_id: str
    step: int
    due_at: datetime
    data: dict[str, str]
    stop: Stop | None = None
    counters: tuple[CapUse, ...] = ()
    variant: str | None = None  # the step's content variant; None: its only content


def _gate_row(due: Due) -> tuple[Any, ...]:
    """A due as a `gate_row_v2` record (migration 008)."""
    stop = due.stop
    return (
        due.occurrence,
        due.user_id,
        due.step,
        due.due_at,
        due.data,
        stop and (stop.status, stop.reason, stop.detail, stop.defer_until),
        [(c.key, c.limit, c.resets_at) for c in due.counters],
        due.variant,
    )


@dataclass(frozen=True)
class ClaimBatch:
    """What every row of a claimed batch shares: the plan (as of `version`), its template and
    consent kind, the claiming replica, and what a full cap does (`on_capped`: 'skip', or
    'defer' to the counter's reset when that is within `max_delay` of the due time)."""

    plan_id: str
    version: int
    template_id: str
    consent_kind: str
    replica: str
    on_capped: str = "skip"
    max_delay: timedelta = timedelta(0)


@dataclass(frozen=True)
class Finished:
    delivery_id: int
    status: Outcome
    reason: Reason | None
    errcode: int | None
    msgid: int | None
    detail: str | None
    defer_until: datetime | None = None  # status 'deferred': put back until then


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but someone else's
        return True
    return True


def _encode_jsonb(value: Any) -> bytes:
    """jsonb's binary format: version 1, then the text (compact: a fan-out's messages are a third
    fewer bytes to send and for PostgreSQL to parse). A lone surrogate cannot be encoded: asyncpg
    raises DataError for it, as PostgreSQL did for its escape."""
    return b"\x01" + compact_json(value).encode()


def _decode_jsonb(data: bytes) -> Any:
    return json.loads(data[1:])


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Binary, so that jsonb can sit inside a composite type (the claim's gate_row_v2).
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


@asynccontextmanager
async def _transaction(
    conn: Conn | asyncpg.Pool,
) -> AsyncIterator[Conn]:
    """A transaction on the pool, or a savepoint inside the caller's open transaction."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c, c.transaction():
            yield c
    else:
        async with conn.transaction():
            yield conn


class Store:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool
        self.fanout = FanOutStore(pool)
        # The read models and the control channel: app code reaches the database through these.
        self.status: StatusReads = StatusStore(pool)
        self.metrics: ClusterGaugeReads = MetricsStore(pool)
        self.control: ControlNotifications = ControlChannel(pool, CONTROL_CHANNEL)
        self.consent = ConsentStore(pool)
        self.activity = ActivityStore(pool)  # what users did: adapt rules (docs/plans.md#adapt)
        self.engagement: EngagementReads = EngagementStore(pool)
        self.plan_files = PlanFilesStore(pool)
        self.lifecycle = LifecycleStore(pool, CONTROL_CHANNEL)
        self.simulation: SimulationReads = SimulationStore(pool)  # `reminders simulate` only
        self.ledger = LedgerStore(pool)  # its partitions and their prune (migration 014)

    @classmethod
    @asynccontextmanager
    async def open(cls, dsn: str, *, max_size: int = 10) -> AsyncIterator[Store]:
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                init=_init_connection,
                # Every query here is short; JIT compiling one whose estimate crosses
                # jit_above_cost took 0.28 s of a 0.33 s engagement read at 10M ledger rows.
                server_settings={"jit": "off"},
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            yield cls(pool)
        finally:
            await pool.close()

    # --- schema ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def exclusively(self, lock_key: int) -> AsyncIterator[None]:
        """Hold a session advisory lock: replicas starting together take turns in this block."""
        async with self.pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
            try:
                yield
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)

    async def migrate(self) -> list[str]:
        """Apply the package's SQL migrations not yet applied, in order; returns their names."""
        files = sorted(
            (
                f
                for f in resources.files("scheduler.store.migrations").iterdir()
                if f.name.endswith(".sql")
            ),
            key=lambda f: f.name,
        )
        applied: list[str] = []
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATIONS_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for file in files:
                if file.name in done:
                    continue
                await conn.execute(file.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", file.name)
                applied.append(file.name)
        for name in applied:
            log.info("applied migration %s", name)
        return applied

    # --- plans ----------------------------------------------------------------------------------

    async def register_plan(self, plan: Plan, source: str) -> Registration:
        """Record this content as the plan's current version (a new version if it changed):
        the one way a loaded plan (a file, a test's, the demo's) reaches the database."""
        plan_id, kind = plan.id, "relative" if plan.is_relative else "calendar"
        content_hash, definition = plan_content_hash(plan), plan.model_dump(mode="json")
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO plans (id, kind) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                plan_id,
                kind,
            )
            row = await conn.fetchrow(
                "SELECT p.current_version, v.content_hash FROM plans p"
                " LEFT JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
                " WHERE p.id = $1 FOR UPDATE OF p",
                plan_id,
            )
            assert row is not None  # the INSERT above made sure the plan's row exists
            changed = row["content_hash"] != content_hash
            if changed:
                # After the newest version, not the current one: an edit back to older content
                # makes an older version current again, and the next edit is newer than all.
                version = await conn.fetchval(
                    "SELECT coalesce(max(version), 0) + 1 FROM plan_versions WHERE plan_id = $1",
                    plan_id,
                )
                await conn.execute(
                    "INSERT INTO plan_versions"
                    " (plan_id, version, content_hash, source_file, definition)"
                    " VALUES ($1, $2, $3, $4, $5)"
                    " ON CONFLICT (plan_id, content_hash) DO UPDATE SET loaded_at = now()",
                    plan_id,
                    version,
                    content_hash,
                    source,
                    definition,
                )
                # An edit back to an older content reuses that version's number.
                version = await conn.fetchval(
                    "SELECT version FROM plan_versions WHERE plan_id = $1 AND content_hash = $2",
                    plan_id,
                    content_hash,
                )
                await conn.execute(
                    "UPDATE plans SET current_version = $2, kind = $3, updated_at = now()"
                    " WHERE id = $1",
                    plan_id,
                    version,
                    kind,
                )
                await conn.execute(
                    "INSERT INTO plan_events (plan_id, action, actor, plan_version, reason)"
                    " VALUES ($1, 'loaded', 'plan-file', $2, $3)",
                    plan_id,
                    version,
                    source,
                )
        record = await self.plan(plan_id)
        assert record is not None
        return Registration(record, changed)

    async def plan(self, plan_id: str) -> PlanRecord | None:
        row = await self.pool.fetchrow(
            _CURRENT_PLANS + " WHERE p.id = $1",
            plan_id,
        )
        return None if row is None else _plan_record(row)

    async def active_plans(self) -> list[PlanRecord]:
        """Every active plan at its current version."""
        rows = await self.pool.fetch(_CURRENT_PLANS + " WHERE p.state = 'active' ORDER BY p.id")
        return [_plan_record(r) for r in rows]

    async def active_enrollments_of(self, user_id: str) -> list[str]:
        """The plans in which the user's enrolment is active."""
        rows = await self.pool.fetch(
            "SELECT plan_id FROM enrollments WHERE user_id = $1 AND status = 'active'"
            " ORDER BY plan_id",
            user_id,
        )
        return [r["plan_id"] for r in rows]

    # --- enrolments -----------------------------------------------------------------------------

    async def enroll(
        self,
        plan_id: str,
        user_id: str,
        start_at: datetime,
        tz: str,
        variables: dict[str, Any],
        next_due_at: datetime | None,
    ) -> None:
        """Enrol a user (or restart their timeline from `start_at` if already enrolled),
        through the one writer of enrolments."""
        from scheduler.domain.enrolment import Enrolment

        await self.consent.upsert_enrollments(
            [Enrolment(plan_id, user_id, start_at, tz, variables, next_due_at)]
        )

    async def plan_state_held(self, conn: Conn, plan_id: str) -> str | None:
        """The plan's state, share-locked until `conn`'s transaction ends (FOR SHARE): a pause
        or cancel waits for the batch that read it."""
        state: str | None = await conn.fetchval(
            "SELECT state FROM plans WHERE id = $1 FOR SHARE", plan_id
        )
        return state

    @asynccontextmanager
    async def due_enrollments(
        self, plan_id: str, now: datetime, batch_size: int
    ) -> AsyncIterator[tuple[Conn, list[Recipient]]]:
        """Lock up to `batch_size` enrolments of a relative plan whose next step is due.

        The caller claims their deliveries and advances them on the same connection before the
        transaction commits; other replicas skip the locked rows.
        """
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT user_id, tz, vars, start_at, next_step, next_due_at FROM enrollments"
                " WHERE plan_id = $1 AND status = 'active' AND next_due_at <= $2"
                " ORDER BY next_due_at LIMIT $3 FOR UPDATE SKIP LOCKED",
                plan_id,
                now,
                batch_size,
            )
            yield (
                conn,
                [
                    Recipient(
                        r["user_id"],
                        r["tz"],
                        r["vars"],
                        r["start_at"],
                        r["next_step"],
                        r["next_due_at"],
                    )
                    for r in rows
                ],
            )

    @staticmethod
    async def advance_enrollments(
        conn: Conn,
        plan_id: str,
        users: Sequence[str],
        next_steps: Sequence[int],
        next_due: Sequence[datetime | None],
    ) -> None:
        await conn.execute(
            "UPDATE enrollments e SET next_step = u.step, next_due_at = u.due, updated_at = now(),"
            " status = CASE WHEN u.due IS NULL THEN 'finished' ELSE e.status END"
            " FROM unnest($2::text[], $3::int[], $4::timestamptz[]) AS u (uid, step, due)"
            " WHERE e.plan_id = $1 AND e.user_id = u.uid",
            plan_id,
            users,
            next_steps,
            next_due,
        )

    async def reschedule_enrollments(
        self, plan_id: str, compute: Callable[[datetime, str, int], datetime | None]
    ) -> int:
        """Recompute every active enrolment's next due time after the plan's schedule changed."""
        changed = 0
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT user_id, tz, start_at, next_step FROM enrollments"
                " WHERE plan_id = $1 AND status = 'active' FOR UPDATE",
                plan_id,
            )
            if rows:
                dues = [compute(r["start_at"], r["tz"], r["next_step"]) for r in rows]
                await self.advance_enrollments(
                    conn,
                    plan_id,
                    [r["user_id"] for r in rows],
                    [r["next_step"] for r in rows],
                    dues,
                )
                changed = len(rows)
        return changed

    # --- consent --------------------------------------------------------------------------------

    async def record_consent(
        self,
        user_id: str,
        template_id: str,
        kind: str,
        result: str,
        source: str,
        event_id: str | None = None,
    ) -> None:
        """Record one popup result (the accounting lives in `scheduler.store.consent`)."""
        from scheduler.domain.consent import Result
        from scheduler.domain.plan import ConsentKind
        from scheduler.store.consent import ConsentReport, ConsentStore

        await ConsentStore(self.pool).record(
            [
                ConsentReport(
                    user_id,
                    template_id,
                    Result(result),
                    source,
                    kind=ConsentKind(kind),
                    event_id=event_id,
                )
            ]
        )

    async def consent_of(self, user_id: str, template_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow(
            "SELECT credits, long_term, banned FROM consent"
            " WHERE user_id = $1 AND template_id = $2",
            user_id,
            template_id,
        )
        return dict(row) if row else None

    # --- the ledger -----------------------------------------------------------------------------

    async def prune_cap_counters(self, now: datetime, batch: int = 10_000) -> int:
        """Forget up to `batch` frequency-cap counters whose window ended a day ago or more (a
        send deferred into a new window counts on a new counter)."""
        status = await self.pool.execute(
            "DELETE FROM cap_counters WHERE key IN (SELECT key FROM cap_counters"
            " WHERE resets_at < $1::timestamptz - interval '1 day' LIMIT $2)",
            now,
            batch,
        )
        return int(status.split()[-1])

    async def plans_with_due_deferrals(self, now: datetime) -> list[str]:
        rows = await self.pool.fetch(
            "SELECT DISTINCT plan_id FROM deliveries"
            " WHERE status = 'deferred' AND defer_until <= $1",
            now,
        )
        return [r["plan_id"] for r in rows]

    @asynccontextmanager
    async def due_deferrals(
        self, plan_id: str, now: datetime, batch_size: int
    ) -> AsyncIterator[tuple[Conn, list[DeferredDelivery]]]:
        """Lock up to `batch_size` deferred rows of a plan whose moment has come (SKIP LOCKED:
        replicas share them); the caller claims them again on the same connection."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "SELECT d.occurrence, d.user_id, d.step, d.due_at, d.message,"
                " coalesce(e.tz, 'UTC') AS tz, coalesce(e.vars, '{}') AS vars,"
                " coalesce(e.start_at, d.due_at) AS start_at,"
                " e.status IS DISTINCT FROM 'stopped' AS enrolled"
                " FROM deliveries d LEFT JOIN enrollments e"
                "  ON e.plan_id = d.plan_id AND e.user_id = d.user_id"
                " WHERE d.plan_id = $1 AND d.status = 'deferred' AND d.defer_until <= $2"
                # Earliest moment first, then the earliest due: the order rules.dry_run decides in.
                " ORDER BY d.defer_until, d.due_at LIMIT $3 FOR UPDATE OF d SKIP LOCKED",
                plan_id,
                now,
                batch_size,
            )
            yield (
                conn,
                [
                    DeferredDelivery(
                        r["occurrence"],
                        r["step"],
                        r["due_at"],
                        r["message"],
                        Recipient(r["user_id"], r["tz"], r["vars"], r["start_at"]),
                        r["enrolled"],
                    )
                    for r in rows
                ],
            )

    async def claim(
        self, conn: Conn | asyncpg.Pool, batch: ClaimBatch, dues: Sequence[Due]
    ) -> list[Claim]:
        """Run a batch through the gate and claim its ledger rows in one round trip
        (claim_deliveries_v2, migration 008): each due's `stop` is the rule the dispatcher
        already decided, its `counters` are counted atomically."""
        async with _transaction(conn) as tx:
            rows = await tx.fetch(
                "SELECT delivery_id, user_id, status, reason FROM claim_deliveries_v2($1, $2)",
                (
                    batch.plan_id,
                    batch.version,
                    batch.template_id,
                    batch.consent_kind,
                    batch.replica,
                    batch.on_capped,
                    batch.max_delay,
                ),
                [_gate_row(d) for d in dues],
            )
        return [
            Claim(r[0], r[1], Outcome(r[2]), Reason(r[3]) if r[3] is not None else None)
            for r in rows
        ]

    async def finish(
        self, template_id: str, consent_kind: str, results: Sequence[Finished]
    ) -> None:
        if not results:
            return
        await self.pool.execute(
            "SELECT finish_deliveries($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            template_id,
            consent_kind,
            [r.delivery_id for r in results],
            [r.status for r in results],
            [r.reason for r in results],
            [r.errcode for r in results],
            [r.msgid for r in results],
            [r.detail for r in results],
            [r.defer_until for r in results],
        )

    async def skip(
        self,
        *,
        plan_id: str,
        version: int,
        replica: str,
        rows: Sequence[tuple[str, str, int, datetime]],  # (occurrence, user, step, due)
        status: str,
        reason: str,
        conn: Conn | None = None,
        details: Sequence[str | None] | None = None,  # one per row (e.g. the adapt rule)
    ) -> None:
        """Record final outcomes that need no send (missed, unrenderable, adapted), once per
        row."""
        if not rows:
            return
        await (conn or self.pool).execute(
            "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
            " status, reason, detail, claimed_by, finished_at, key_at)"
            " SELECT $1, $2, u.occ, u.uid, u.step, u.due, $3, $4, u.detail, $5, now(),"
            "  ledger_key_at(u.occ, u.due)"
            " FROM unnest($6::text[], $7::text[], $8::int[], $9::timestamptz[], $10::text[])"
            "  AS u (occ, uid, step, due, detail)"
            " ON CONFLICT (plan_id, occurrence, user_id, key_at) DO NOTHING",
            plan_id,
            version,
            status,
            reason,
            replica,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            list(details) if details is not None else [None] * len(rows),
        )

    async def outcome_counts(self, plan_id: str | None = None) -> dict[tuple[str, str | None], int]:
        rows = await self.pool.fetch(
            "SELECT status, reason, count(*) AS n FROM deliveries"
            " WHERE $1::text IS NULL OR plan_id = $1 GROUP BY status, reason",
            plan_id,
        )
        return {(r["status"], r["reason"]): r["n"] for r in rows}

    # --- replicas -------------------------------------------------------------------------------

    async def heartbeat(self, replica: str, host: str, pid: int, *, starting: bool = False) -> None:
        """Keep this replica's row fresh; at start, refuse an id that a live process holds."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT host, pid, last_seen > now() - interval '15 seconds' AS live"
                " FROM replicas WHERE id = $1 FOR UPDATE",
                replica,
            )
            if (
                starting
                and row
                and row["live"]
                and (row["host"], row["pid"]) != (host, pid)
                and (row["host"] != host or _pid_alive(row["pid"]))
            ):
                raise StoreError(
                    f"replica id {replica!r} is in use by a live daemon (pid {row['pid']} on "
                    f"{row['host']}); give each replica its own REMINDERS_REPLICA_ID"
                )
            await conn.execute(
                "INSERT INTO replicas (id, host, pid) VALUES ($1, $2, $3)"
                " ON CONFLICT (id) DO UPDATE SET host = $2, pid = $3, last_seen = now()"
                + (", started_at = now()" if starting else ""),
                replica,
                host,
                pid,
            )

    async def retire(self, replica: str) -> None:
        """A clean stop: the replica's id is free for its successor at once."""
        await self.pool.execute(
            "UPDATE replicas SET last_seen = '-infinity' WHERE id = $1", replica
        )


# --- durable fan-out: occurrences, chunks, the flight record --------------------------------------

# A connection lost, a server restarting or shutting down: the same statement will work later.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InterfaceError,
    asyncpg.exceptions._base.InternalClientError,  # a connection broken mid-protocol
    asyncpg.TooManyConnectionsError,
)


def is_transient(exc: BaseException) -> bool:
    """A database failure that waiting and trying again can cure (an outage, a restart)."""
    return isinstance(exc, TRANSIENT_DB_ERRORS)


def retry_transient(
    give_up_after_s: float | None = None, *, what: str = "a database call"
) -> AsyncRetrying:
    """Tenacity's loop for database calls through an outage: exponential backoff with jitter,
    0.1 s up to 5 s, for `give_up_after_s` (None: until it works)."""

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("%s failed (%s), retrying (attempt %d)", what, exc, state.attempt_number)

    return AsyncRetrying(
        retry=retry_if_exception(is_transient),
        wait=wait_random_exponential(multiplier=0.1, max=5),
        stop=stop_never if give_up_after_s is None else stop_after_delay(give_up_after_s),
        before_sleep=log_retry,
        reraise=True,
    )


_CURRENT_PLANS = (
    "SELECT p.id, p.state, p.current_version, p.registered_at, v.content_hash, v.definition"
    " FROM plans p JOIN plan_versions v ON v.plan_id = p.id AND v.version = p.current_version"
)


def _plan_record(row: asyncpg.Record) -> PlanRecord:
    return PlanRecord(
        row["id"],
        PlanState(row["state"]),
        row["current_version"],
        row["content_hash"],
        row["definition"],
        row["registered_at"],
    )


@dataclass(frozen=True)
class SendRate:
    """At most `per_second` sends a second for the WeChat app `app`, across all replicas."""

    app: str
    per_second: float


class Fenced(StoreError):
    """This replica no longer holds the chunk (another replica took it over, or the plan
    stopped): the work on it ends here."""


@dataclass(frozen=True)
class Chunk:
    id: int
    occurrence_id: int
    plan_id: str
    occurrence: str
    step: int
    fire_time: datetime
    after_user: str  # exclusive; '' from the start
    last_user: str | None  # inclusive; None to the end
    cursor: str  # continue after this user
    resumed: bool  # taken after another holder left it


@dataclass(frozen=True)
class Released:
    """A claimed row its replica never handed to the channel, back in the pool: the gate already
    passed it (credit taken, caps counted); only the send is left."""

    delivery_id: int
    plan_id: str
    occurrence: str
    user_id: str
    step: int
    due_at: datetime
    message: dict[str, Any]


@dataclass(frozen=True)
class Recovered:
    replica: str
    unknown: int
    released: int
    chunks: int


class FanOutStore:
    """The queries of the durable fan-out, on the shared pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @asynccontextmanager
    async def held_connection(self) -> AsyncIterator[Conn]:
        """One connection for a run of round trips (`record_flight(conn=...)`): a pool checkout
        per round trip would cost as much as the round trip."""
        async with self.pool.acquire() as conn:
            yield conn

    async def record_occurrence(
        self, plan_id: str, occurrence: str, step: int, fire_time: datetime, chunk_size: int
    ) -> int:
        """Record a fired occurrence as work (once: a double fire meets the same row), split
        into chunks of `chunk_size` users; returns its id."""
        async with self.pool.acquire() as conn, conn.transaction():
            occurrence_id: int | None = await conn.fetchval(
                "INSERT INTO occurrences (plan_id, occurrence, step, fire_time, total)"
                " SELECT $1, $2, $3, $4, count(*) FROM enrollments"
                "  WHERE plan_id = $1 AND status = 'active'"
                " ON CONFLICT (plan_id, occurrence) DO NOTHING RETURNING id",
                plan_id,
                occurrence,
                step,
                fire_time,
            )
            if occurrence_id is None:
                existing: int = await conn.fetchval(
                    "SELECT id FROM occurrences WHERE plan_id = $1 AND occurrence = $2",
                    plan_id,
                    occurrence,
                )
                return existing
            bounds = await conn.fetch(
                "SELECT user_id FROM (SELECT user_id, row_number() OVER (ORDER BY user_id) AS n"
                "  FROM enrollments WHERE plan_id = $1 AND status = 'active') AS a"
                " WHERE n % $2 = 0 ORDER BY user_id",
                plan_id,
                chunk_size,
            )
            edges = [None, *(r["user_id"] for r in bounds), None]
            await conn.execute(
                "INSERT INTO occurrence_chunks (occurrence_id, after_user, last_user)"
                " SELECT $1, a, l FROM unnest($2::text[], $3::text[]) AS u (a, l)",
                occurrence_id,
                edges[:-1],
                edges[1:],
            )
            # Every replica's work loop wakes up and takes a share (on commit).
            await conn.execute(
                "SELECT pg_notify($1, $2)", CONTROL_CHANNEL, json.dumps({"kind": "work"})
            )
            return occurrence_id

    async def take_chunk(
        self, replica: str, *, occurrence_id: int | None = None, busy: Sequence[int] = ()
    ) -> Chunk | None:
        """Take the oldest free chunk of an active (or just completed) plan, SKIP LOCKED; or one
        this replica holds but is not working on (`busy` are the ones it is)."""
        row = await self.pool.fetchrow(
            "UPDATE occurrence_chunks c SET owner = $1, updated_at = now(),"
            " takeovers = c.takeovers + (c.last_owner IS NOT NULL)::int"
            " FROM (SELECT c2.id, o.plan_id, o.occurrence, o.step, o.fire_time"
            "  FROM occurrence_chunks c2 JOIN occurrences o ON o.id = c2.occurrence_id"
            "  JOIN plans p ON p.id = o.plan_id"
            "  WHERE c2.state = 'todo' AND p.state = ANY ($4::text[])"
            "   AND (c2.owner IS NULL OR (c2.owner = $1 AND NOT c2.id = ANY ($3::bigint[])))"
            "   AND ($2::bigint IS NULL OR c2.occurrence_id = $2)"
            "  ORDER BY o.fire_time, c2.id LIMIT 1 FOR UPDATE OF c2 SKIP LOCKED) AS t"
            " WHERE c.id = t.id"
            " RETURNING c.id, c.occurrence_id, t.plan_id, t.occurrence, t.step, t.fire_time,"
            "  c.after_user, c.last_user, c.cursor, c.last_owner",
            replica,
            occurrence_id,
            list(busy),
            SENDING_STATES,
        )
        if row is None:
            return None
        after = row["after_user"] or ""
        return Chunk(
            row["id"],
            row["occurrence_id"],
            row["plan_id"],
            row["occurrence"],
            row["step"],
            row["fire_time"],
            after,
            row["last_user"],
            row["cursor"] or after,
            row["last_owner"] is not None,
        )

    async def chunk_audience(self, chunk: Chunk, after: str, limit: int) -> list[Recipient]:
        rows = await self.pool.fetch(
            "SELECT user_id, tz, vars, start_at FROM enrollments"
            " WHERE plan_id = $1 AND status = 'active' AND user_id > $2"
            "  AND ($3::text IS NULL OR user_id <= $3)"
            " ORDER BY user_id LIMIT $4",
            chunk.plan_id,
            after,
            chunk.last_user,
            limit,
        )
        return [Recipient(r["user_id"], r["tz"], r["vars"], r["start_at"]) for r in rows]

    @asynccontextmanager
    async def chunk_batch(self, chunk: Chunk, replica: str, cursor: str) -> AsyncIterator[Conn]:
        """A transaction that moves the chunk's cursor to `cursor` and commits only with what
        the caller claims in it; raises Fenced when the replica no longer holds the chunk or the
        plan stopped (the plan row is held FOR SHARE: a pause waits for this batch)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # One round trip for both: a fan-out's producer waits on each of a batch's.
            row = await conn.fetchrow(
                "WITH plan AS (SELECT state FROM plans WHERE id = $4 FOR SHARE),"
                " moved AS (UPDATE occurrence_chunks SET cursor = $3, updated_at = now()"
                "  WHERE id = $1 AND owner = $2 AND state = 'todo'"
                "   AND (SELECT state FROM plan) = ANY ($5::text[]) RETURNING id)"
                " SELECT (SELECT state FROM plan), (SELECT id FROM moved)",
                chunk.id,
                replica,
                cursor,
                chunk.plan_id,
                SENDING_STATES,
            )
            assert row is not None  # the SELECT without FROM returns one row
            state, moved = row
            if state not in SENDING_STATES:
                raise Fenced(f"plan {chunk.plan_id} is {state}")
            if moved is None:
                raise Fenced(f"chunk {chunk.id} is no longer held by {replica}")
            yield conn

    async def release_chunk(self, chunk: Chunk, replica: str, *, done: bool) -> bool:
        """Finish (`done`) or let go of a chunk; when its occurrence has no chunk left to do,
        the occurrence is done: returns True then (to this one caller only)."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Replicas closing the last chunks of one occurrence take turns: each must see the
            # others' chunks done, or none would close the occurrence.
            await conn.execute(
                "SELECT 1 FROM occurrences WHERE id = $1 FOR UPDATE", chunk.occurrence_id
            )
            await conn.execute(
                "UPDATE occurrence_chunks SET state = CASE WHEN $3 THEN 'done' ELSE state END,"
                " owner = NULL, last_owner = $2, updated_at = now()"
                " WHERE id = $1 AND owner = $2",
                chunk.id,
                replica,
                done,
            )
            if not done:
                return False
            finished = await conn.fetchval(
                "UPDATE occurrences o SET state = 'done', finished_at = now()"
                " WHERE o.id = $1 AND o.state = 'running' AND NOT EXISTS ("
                "  SELECT 1 FROM occurrence_chunks c WHERE c.occurrence_id = o.id"
                "  AND c.state = 'todo') RETURNING id",
                chunk.occurrence_id,
            )
            return finished is not None

    async def record_chunk_missed(
        self, conn: Conn, chunk: Chunk, version: int, replica: str
    ) -> int:
        """Every active enrolment of the chunk after its cursor without a ledger row for the
        occurrence gets `missed` (grace_exceeded)."""
        status = await conn.execute(
            "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
            " status, reason, claimed_by, finished_at, key_at)"
            " SELECT $1, $2, $3, e.user_id, $4, $5, 'missed', 'grace_exceeded', $6, now(),"
            "  ledger_key_at($3, $5)"
            " FROM enrollments e WHERE e.plan_id = $1 AND e.status = 'active'"
            "  AND e.user_id > $7 AND ($8::text IS NULL OR e.user_id <= $8)"
            " ON CONFLICT (plan_id, occurrence, user_id, key_at) DO NOTHING",
            chunk.plan_id,
            version,
            chunk.occurrence,
            chunk.step,
            chunk.fire_time,
            replica,
            chunk.cursor,
            chunk.last_user,
        )
        return int(status.split()[-1])

    async def occurrence_counts(self, plan_id: str, occurrence: str) -> dict[str, int]:
        rows = await self.pool.fetch(
            "SELECT status || coalesce(':' || reason, '') AS k, count(*) AS n FROM deliveries"
            " WHERE plan_id = $1 AND occurrence = $2 GROUP BY 1 ORDER BY 1",
            plan_id,
            occurrence,
        )
        return {r["k"]: r["n"] for r in rows}

    async def close_occurrences(self, conn: Conn, plan_id: str) -> int:
        """A cancelled plan's running occurrences end: nothing more is claimed for them."""
        # The occurrences first, then their chunks: the order release_chunk takes them in, so a
        # replica letting a chunk go meanwhile waits instead of deadlocking with this.
        await conn.execute(
            "SELECT 1 FROM occurrences WHERE plan_id = $1 AND state = 'running'"
            " ORDER BY id FOR UPDATE",
            plan_id,
        )
        await conn.execute(
            "UPDATE occurrence_chunks c SET state = 'done', owner = NULL, updated_at = now()"
            " FROM occurrences o WHERE o.id = c.occurrence_id AND o.plan_id = $1"
            " AND c.state = 'todo'",
            plan_id,
        )
        status = await conn.execute(
            "UPDATE occurrences SET state = 'done', finished_at = now()"
            " WHERE plan_id = $1 AND state = 'running'",
            plan_id,
        )
        return int(status.split()[-1])

    async def stop_occurrences(
        self, plan_id: str, replica: str, status: str, reason: str, detail: str
    ) -> int:
        """A plan stopped for the damage an errcode does (scheduler/app/damage.py): the rest of
        its running occurrences (users without a ledger row, and rows given back to the pool) is
        recorded with `status`/`reason` instead of being sent, and the occurrences end. Run after
        the plan left `active`, so no batch can claim meanwhile. Returns the rows recorded."""
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = await conn.execute(
                "INSERT INTO deliveries (plan_id, plan_version, occurrence, user_id, step, due_at,"
                " status, reason, detail, claimed_by, finished_at, key_at)"
                " SELECT o.plan_id, p.current_version, o.occurrence, e.user_id, o.step,"
                "  o.fire_time, $3, $4, $5, $2, now(), ledger_key_at(o.occurrence, o.fire_time)"
                " FROM occurrences o JOIN plans p ON p.id = o.plan_id"
                " JOIN occurrence_chunks c ON c.occurrence_id = o.id AND c.state = 'todo'"
                " JOIN enrollments e ON e.plan_id = o.plan_id AND e.status = 'active'"
                "  AND e.user_id > coalesce(c.cursor, c.after_user, '')"
                "  AND (c.last_user IS NULL OR e.user_id <= c.last_user)"
                " WHERE o.plan_id = $1 AND o.state = 'running'"
                " ON CONFLICT (plan_id, occurrence, user_id, key_at) DO NOTHING",
                plan_id,
                replica,
                status,
                reason,
                detail,
            )
            pooled = await conn.execute(
                "UPDATE deliveries SET status = $2, reason = $3, detail = $4, finished_at = now()"
                " WHERE plan_id = $1 AND status = 'pending' AND claimed_by IS NULL",
                plan_id,
                status,
                reason,
                detail,
            )
            await self.close_occurrences(conn, plan_id)
        return int(inserted.split()[-1]) + int(pooled.split()[-1])

    # --- the flight record ------------------------------------------------------------------

    async def record_flight(
        self,
        replica: str,
        still_in_flight: Sequence[int],
        candidates: Sequence[int],
        results: Sequence[tuple[str, str, Finished]],  # (template, consent kind, result)
        *,
        conn: Conn | None = None,
        rate: SendRate | None = None,
    ) -> tuple[set[int], set[int]]:
        """Write finished sends' results and authorize `candidates` to go on the wire, in one
        transaction. Returns the candidates authorized (still pending and ours) and, under a
        `rate`, those that wait for the app's bucket (still ours: ask again)."""
        args = (
            replica,
            list(still_in_flight),
            list(candidates),
            [r.delivery_id for _, _, r in results],
            [t for t, _, _ in results],
            [k for _, k, _ in results],
            [r.status for _, _, r in results],
            [r.reason for _, _, r in results],
            [r.errcode for _, _, r in results],
            [r.msgid for _, _, r in results],
            [r.detail for _, _, r in results],
            [r.defer_until for _, _, r in results],
        )
        if rate is None:
            authorized = await (conn or self.pool).fetchval(
                "SELECT record_flight_v1($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)", *args
            )
            return set(authorized), set()
        row = await (conn or self.pool).fetchrow(
            "SELECT * FROM record_flight_v2($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14)",
            *args,
            rate.app,
            rate.per_second,
        )
        assert row is not None  # record_flight_v2 returns one row
        return set(row["authorized"]), set(row["waiting"])

    async def recover(self, replica: str, dead_after_s: float | None = None) -> Recovered:
        """Give up `replica`'s work (when silent for `dead_after_s`, or unconditionally: its own
        at start and stop): maybe-sent rows become `unknown`, the rest goes back to the pool."""
        row = await self.pool.fetchrow(
            "SELECT * FROM recover_replica_v1($1, $2)",
            replica,
            None if dead_after_s is None else timedelta(seconds=dead_after_s),
        )
        if row is None:
            return Recovered(replica, 0, 0, 0)
        return Recovered(replica, row["unknown"], row["released"], row["chunks"])

    async def recover_dead(self, dead_after_s: float) -> list[Recovered]:
        """Recover every replica silent for `dead_after_s` that still holds rows or chunks."""
        rows = await self.pool.fetch(
            "SELECT r.id FROM replicas r"
            " WHERE r.last_seen < now() - make_interval(secs => $1) AND ("
            "  EXISTS (SELECT 1 FROM deliveries d WHERE d.status = 'pending'"
            "   AND d.claimed_by = r.id)"
            "  OR EXISTS (SELECT 1 FROM occurrence_chunks c WHERE c.owner = r.id"
            "   AND c.state = 'todo'))",
            dead_after_s,
        )
        done = [await self.recover(r["id"], dead_after_s) for r in rows]
        # Rows claimed by a name that never had a replica row (e.g. a tool) count as dead too.
        orphans = await self.pool.fetch(
            "SELECT DISTINCT d.claimed_by FROM deliveries d"
            " WHERE d.status = 'pending' AND d.claimed_by IS NOT NULL"
            " AND d.claimed_at < now() - make_interval(secs => $1)"
            " AND NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = d.claimed_by)",
            dead_after_s,
        )
        done += [await self.recover(r["claimed_by"], dead_after_s) for r in orphans]
        return [r for r in done if r.unknown or r.released or r.chunks]

    async def release_strays(self, replica: str, held: Sequence[int], older_than_s: float) -> int:
        """Give back to the pool `replica`'s pending rows claimed over `older_than_s` ago that
        are neither `held` by its pipelines nor recorded in flight (under the replica's lock,
        as a recovery)."""
        status = await self.pool.execute(
            "WITH r AS (SELECT in_flight FROM replicas WHERE id = $1 FOR UPDATE)"
            " UPDATE deliveries d SET claimed_by = NULL"
            " WHERE d.status = 'pending' AND d.claimed_by = $1"
            "  AND d.claimed_at < now() - make_interval(secs => $3)"
            "  AND NOT d.id = ANY ($2::bigint[])"
            "  AND NOT d.id = ANY (coalesce((SELECT in_flight FROM r), '{}'))",
            replica,
            list(held),
            older_than_s,
        )
        return int(status.split()[-1])

    async def adopt_released(self, replica: str, limit: int) -> list[Released]:
        """Take up to `limit` rows back in the pool (SKIP LOCKED), oldest first."""
        rows = await self.pool.fetch(
            "UPDATE deliveries d SET claimed_by = $1, claimed_at = now()"
            " FROM (SELECT id FROM deliveries WHERE status = 'pending' AND claimed_by IS NULL"
            "  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED) AS t"
            " WHERE d.id = t.id"
            " RETURNING d.id, d.plan_id, d.occurrence, d.user_id, d.step, d.due_at, d.message",
            replica,
            limit,
        )
        return [
            Released(
                r["id"],
                r["plan_id"],
                r["occurrence"],
                r["user_id"],
                r["step"],
                r["due_at"],
                r["message"] or {},
            )
            for r in rows
        ]

    async def progress(self) -> list[dict[str, Any]]:
        """Each running occurrence: its counts so far, holders, start, and whether it was
        resumed or looks stuck (no chunk moved for a minute while chunks are left)."""
        rows = await self.pool.fetch(
            "SELECT o.plan_id, o.occurrence, o.step, o.total, o.created_at, l.recorded, l.sent,"
            " array_remove(array_agg(DISTINCT c.owner), NULL) AS holders,"
            " count(*) FILTER (WHERE c.state = 'todo') AS chunks_left, count(*) AS chunks,"
            " coalesce(sum(c.takeovers), 0) AS takeovers,"
            " max(c.updated_at) AS last_progress, now() AS now"
            " FROM occurrences o JOIN occurrence_chunks c ON c.occurrence_id = o.id"
            " CROSS JOIN LATERAL (SELECT count(*) AS recorded,"
            "  count(*) FILTER (WHERE d.status = 'sent') AS sent FROM deliveries d"
            "  WHERE d.plan_id = o.plan_id AND d.occurrence = o.occurrence) AS l"
            " WHERE o.state = 'running' GROUP BY o.id, l.recorded, l.sent ORDER BY o.fire_time"
        )
        out = []
        for r in rows:
            elapsed = max((r["now"] - r["created_at"]).total_seconds(), 1e-3)
            out.append(
                {
                    "plan_id": r["plan_id"],
                    "occurrence": r["occurrence"],
                    "step": r["step"],
                    "total": r["total"],
                    "recorded": r["recorded"],
                    "sent": r["sent"],
                    "holders": sorted(r["holders"]),
                    "chunks": r["chunks"],
                    "chunks_left": r["chunks_left"],
                    "started_at": r["created_at"].isoformat(),
                    "rate_per_s": round(r["recorded"] / elapsed, 1),
                    "resumed": r["takeovers"] > 0,
                    "stuck": (r["now"] - r["last_progress"]).total_seconds() > 60,
                }
            )
        return out
