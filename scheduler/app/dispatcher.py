"""The dispatcher: turns one fire of a plan into sends, through the gate, into the ledger.

A calendar plan's fire is recorded as durable work first (an occurrence split into chunks of its
audience); the chunks are then taken under the replica's lease by any replica (this one, and the
others' work loops), and a chunk taken over after its holder died continues after its cursor. A
relative plan's sweep takes the enrolments whose next step is due. Either way the audience is
streamed in batches: each batch is claimed in the ledger with its consent in one round trip, the
allowed sends go to a pool of workers, and every send is recorded in flight before it leaves and
its result after (scheduler/app/flight.py), so a crash leaves `unknown` only what may have been
sent; what was claimed but never handed to the channel goes back to the pool (`Released`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from scheduler.app import metrics
from scheduler.app.damage import DamageControl, scope_of
from scheduler.app.flight import FlightRecorder
from scheduler.app.lifecycle import Lifecycle, LifecycleError
from scheduler.app.quota import QuotaWatch, quota_reset_after
from scheduler.channels.base import Channel, OutgoingMessage, SendResult
from scheduler.domain.adapt import NEVER_SEEN, Adaptation, decide, extra_occurrence
from scheduler.domain.messages import RenderError, render, variant_for
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import Plan
from scheduler.domain.plan_state import PlanState
from scheduler.domain.policy import DEFAULT_POLICY, Policy
from scheduler.domain.rules import (
    USER_SLOT,
    Decision,
    Limits,
    Violation,
    defer_or_skip,
    limit_key_value,
    message_violation,
    moment_decision,
    plan_limits,
)
from scheduler.domain.schedule import (
    calendar_anchor,
    calendar_step,
    calendar_trigger,
    is_repeated_wall_time,
    relative_due,
)
from scheduler.domain.tracking import page_tracker
from scheduler.settings import SEND_CONCURRENCY
from scheduler.store.postgres import (
    CapUse,
    Chunk,
    Claim,
    ClaimBatch,
    DeferredDelivery,
    Due,
    Fenced,
    Finished,
    PlanRecord,
    Recipient,
    Released,
    SendRate,
    Stop,
    Store,
    retry_transient,
)

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
# A recipient's (occurrence key, step, due time, zone the message is rendered in) in a batch.
When = Callable[[Recipient], tuple[str, int, datetime, ZoneInfo]]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class FanOutReport:
    claimed: int = 0
    sent: int = 0
    failed: int = 0
    gate: dict[str, int] = field(default_factory=dict)  # "skipped:capped" -> n, every stop
    already_claimed: int = 0
    missed: int = 0
    unrenderable: int = 0
    withdrawn: int = 0  # claimed, then given back to the pool before it was sent (a recovery)
    resent: int = 0  # unknown, and given back to be sent again (the plan's resend_unknown)
    stopped: bool = False  # the plan stopped being active, or the daemon is stopping

    @property
    def outcomes(self) -> dict[str, int]:
        """What the log line shows: sends, refusals by `status:reason`, what was left alone."""
        return {
            "sent": self.sent,
            "failed": self.failed,
            "already_claimed": self.already_claimed,
            "missed": self.missed,
            **self.gate,
        }

    @property
    def no_consent(self) -> int:
        return self.gate.get("skipped:no_consent", 0)

    def stopped_by_gate(self, status: str, reason: str | None) -> None:
        key = f"{status}:{reason}"
        self.gate[key] = self.gate.get(key, 0) + 1


@dataclass(frozen=True)
class ActivePlan:
    record: PlanRecord
    plan: Plan


class Dispatcher:
    def __init__(
        self,
        store: Store,
        channel: Channel,
        *,
        replica_id: str,
        concurrency: int = SEND_CONCURRENCY,
        batch_size: int = 500,
        clock: Clock = utc_now,
        policy: Policy = DEFAULT_POLICY,
        chunk_size: int = 1000,
        send_rate: SendRate | None = None,
        quota_check_s: float = 60.0,
        quota_reserves: dict[str, float] | None = None,
        lifecycle: Lifecycle | None = None,
    ):
        self.store = store
        # Plan and enrolment states change only through the lifecycle (its transitions, audit
        # row and NOTIFY): completing a plan and the damage stops go through the daemon's.
        self.lifecycle = lifecycle or Lifecycle(store, clock=clock)
        self.chunk_size = chunk_size
        self.recorder = FlightRecorder(store.fanout, replica_id, concurrency, rate=send_rate)
        self.damage = DamageControl(store, self.lifecycle, replica_id)
        self._busy: set[int] = set()  # the chunks this replica is working on
        self._taking = asyncio.Lock()
        self._queued: set[int] = set()  # claimed rows in this process's pipelines, not done
        self.channel = channel
        self.replica_id = replica_id
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.clock = clock
        self.policy = policy  # the plans folder's policy.yaml, replaced when it changes
        self.quota_held_until: datetime | None = None  # WeChat answered 45009: no sends till then
        self.quota = QuotaWatch(
            channel.quota, clock, check_s=quota_check_s, reserves=quota_reserves
        )
        self.stopping = asyncio.Event()  # set on shutdown: no new batch is claimed
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._plans: dict[tuple[str, int], Plan] = {}
        # (plan, policy, message) -> steps 4-5's verdict, (plan, policy, ("limits",)) -> limits;
        # an entry holds the plan and policy, so their ids cannot be reused while it exists.
        self._verdicts: dict[tuple[int, int, tuple[Any, ...]], tuple[Plan, Policy, Any]] = {}

    async def drain(self, within_s: float) -> bool:
        """Stop claiming and wait for the fan-outs in progress to finish their sends."""
        self.stopping.set()
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def load(self, plan_id: str) -> ActivePlan | None:
        """The plan's current version from the database (the truth every replica shares)."""
        record = await self.store.plan(plan_id)
        if record is None:
            return None
        key = (record.id, record.version)
        if key not in self._plans:
            self._plans[key] = Plan.model_validate(record.definition)
        return ActivePlan(record, self._plans[key])

    async def fire(self, plan_id: str, fire_time: datetime) -> FanOutReport:
        """Handle one fire of a plan's schedule (the entry point of the APScheduler task)."""
        if self.stopping.is_set():
            return FanOutReport(stopped=True)
        active = await self.load(plan_id)
        if active is None:
            log.warning("schedule fired for unknown plan %s", plan_id, extra={"plan_id": plan_id})
            return FanOutReport()
        if not active.record.state.fires:
            log.info(
                "plan %s is %s: fire skipped",
                plan_id,
                active.record.state,
                extra={"plan_id": plan_id},
            )
            return FanOutReport(stopped=True)
        metrics.observe_fire(
            "sweep" if active.plan.is_relative else "calendar",
            (self.clock() - fire_time).total_seconds(),
        )
        if active.plan.is_relative:
            return await self.sweep(active)
        # Sends deferred to this moment go before the new occurrence's: when they compete for a
        # cap, the older message wins, as `preview` (rules.dry_run) says.
        await self.retry_deferred(plan_id)
        return await self.fan_out(active, fire_time)

    # --- calendar plans -------------------------------------------------------------------------

    async def fan_out(self, active: ActivePlan, fire_time: datetime) -> FanOutReport:
        """Record the occurrence as work (chunks of the audience), then work on its chunks until
        none is left for this replica; other replicas take the others."""
        cal = active.plan.schedule.calendar
        assert cal is not None
        if is_repeated_wall_time(fire_time, cal.timezone) and cal.every is None:
            return FanOutReport()  # the second 01:30 of a DST fall-back night
        step = calendar_step(cal, calendar_anchor(cal, active.record.registered_at), fire_time)
        if step is None:
            log.warning(
                "plan %s fired at %s, which is not one of its occurrences",
                active.record.id,
                fire_time.isoformat(),
                extra={"plan_id": active.record.id},
            )
            return FanOutReport()
        # The occurrence is keyed by its scheduled time, so a double fire meets the same rows.
        occurrence_id: int = await retry_transient(60, what="recording an occurrence")(
            self.store.fanout.record_occurrence,
            active.record.id,
            occurrence_key(fire_time),
            step,
            fire_time,
            self.chunk_size,
        )
        report = FanOutReport()
        await self.work(report, occurrence_id=occurrence_id)
        return report

    async def record_missed(self, plan_id: str, fire_time: datetime) -> int:
        """An occurrence that could not start within the plan's grace (the daemon was down):
        recorded like any other, its chunks record `missed` for the whole audience."""
        active = await self.load(plan_id)
        if active is None or active.plan.is_relative:
            return 0  # a relative plan's next sweep finds its late steps by itself
        return (await self.fan_out(active, fire_time)).missed

    async def work(self, report: FanOutReport, *, occurrence_id: int | None = None) -> None:
        """Take chunks (of one occurrence, or of any) and work on them until none is free. The
        chunks of one occurrence flow through one pipeline: the next chunk's batches are claimed
        while the last one's sends are still going."""
        while not self.stopping.is_set():
            chunk = await self._take(occurrence_id)
            if chunk is None:
                return
            active = await self.load(chunk.plan_id)
            assert active is not None and active.plan.schedule.calendar is not None
            finished: list[Chunk] = []
            stopped, report.stopped = report.stopped, False
            await self._pipeline(active, self._chunks(active, chunk, report, finished), report)
            for done in finished:
                await self._occurrence_done(active, done)
            report.stopped = report.stopped or stopped
            if report.stopped:
                return

    async def _take(self, occurrence_id: int | None) -> Chunk | None:
        async with self._taking:  # `busy` must be current: one taker at a time
            chunk: Chunk | None = await retry_transient(60, what="taking a chunk")(
                self.store.fanout.take_chunk,
                self.replica_id,
                occurrence_id=occurrence_id,
                busy=sorted(self._busy),
            )
            if chunk is not None:
                self._busy.add(chunk.id)
            return chunk

    async def release_strays(self, older_than_s: float) -> int:
        """Give back to the pool this replica's pending rows that no pipeline of it holds (a
        claim whose commit went through while its reply was lost in an outage): nothing stays
        pending under a live replica."""
        return await self.store.fanout.release_strays(
            self.replica_id, sorted(self._queued), older_than_s
        )

    async def work_released(self, report: FanOutReport) -> None:
        """Send what recoveries gave back to the pool (claimed, never handed to the channel):
        the gate already passed these rows; past the plan's grace they are recorded missed."""
        while not self.stopping.is_set():
            rows = await self.store.fanout.adopt_released(self.replica_id, self.batch_size)
            if not rows:
                return
            by_plan: dict[str, list[Released]] = {}
            for row in rows:
                by_plan.setdefault(row.plan_id, []).append(row)
            for plan_id, plan_rows in by_plan.items():
                await self._send_released(plan_id, plan_rows, report)

    async def _send_released(
        self, plan_id: str, rows: list[Released], report: FanOutReport
    ) -> None:
        active = await self.load(plan_id)
        assert active is not None  # a ledger row's plan is never deleted
        grace, now = active.plan.schedule.grace.as_timedelta(), self.clock()
        late = [r for r in rows if now - r.due_at > grace]
        for r in late:
            stop = Stop(Outcome.MISSED, Reason.GRACE_EXCEEDED, "given back after a crash, too late")
            self.recorder.finished(
                active.plan.template.id,
                active.plan.consent.value,
                _held(r.delivery_id, stop),
                sent=False,
            )
        report.missed += len(late)
        metrics.count(plan_id, Outcome.MISSED, Reason.GRACE_EXCEEDED, len(late))
        ready = [r for r in rows if now - r.due_at <= grace]
        dues = [
            Due(
                r.occurrence, r.user_id, r.step, r.due_at, {k: str(v) for k, v in r.message.items()}
            )
            for r in ready
        ]
        claims = [Claim(r.delivery_id, r.user_id, Outcome.PENDING) for r in ready]

        async def batches() -> AsyncIterator[tuple[list[Due], list[Claim] | None]]:
            yield dues, claims

        if ready:
            log.info(
                "plan %s: sending %d claimed rows given back by a recovery",
                plan_id,
                len(ready),
                extra={"plan_id": plan_id},
            )
            await self._pipeline(active, batches(), report, keyed_by_delivery=True)

    async def _chunks(
        self, active: ActivePlan, chunk: Chunk | None, report: FanOutReport, finished: list[Chunk]
    ) -> AsyncIterator[tuple[list[Due], list[Claim] | None]]:
        """The batches of `chunk`, then of the next free chunks of its occurrence. A chunk whose
        audience is all claimed is done (its sends are the flight recorder's); one this replica
        stops working on is let go for another replica to continue after its cursor. Chunks that
        closed their occurrence go to `finished`."""
        while chunk is not None:
            if chunk.resumed:
                log.warning(
                    "plan %s occurrence %s: resuming chunk %d after %r",
                    chunk.plan_id,
                    chunk.occurrence,
                    chunk.id,
                    chunk.cursor or "the start",
                    extra={"plan_id": chunk.plan_id, "occurrence": chunk.occurrence},
                )
            stopped = False
            try:
                if self.clock() - chunk.fire_time > active.plan.schedule.grace.as_timedelta():
                    stopped = not await self._chunk_missed(active, chunk, report)
                else:
                    async for batch in self._chunk_batches(active, chunk, report):
                        if batch is None:
                            stopped = True
                            break
                        yield batch
                closed: bool = await retry_transient(60, what="closing a chunk")(
                    self.store.fanout.release_chunk, chunk, self.replica_id, done=not stopped
                )
                if closed:
                    finished.append(chunk)
            finally:
                self._busy.discard(chunk.id)  # left owned if abandoned: this replica retakes it
            if stopped or self.stopping.is_set():
                yield [], None
                return
            chunk = await self._take(chunk.occurrence_id)

    async def _chunk_batches(
        self, active: ActivePlan, chunk: Chunk, report: FanOutReport
    ) -> AsyncIterator[tuple[list[Due], list[Claim]] | None]:
        """One chunk's batches after its cursor; None when the chunk is no longer this
        replica's to work on (fenced, the plan stopped, or the daemon is stopping)."""
        cal = active.plan.schedule.calendar
        assert cal is not None
        tz = ZoneInfo(cal.timezone)
        cursor = chunk.cursor

        def when(_: Recipient) -> tuple[str, int, datetime, ZoneInfo]:
            return chunk.occurrence, chunk.step, chunk.fire_time, tz

        more = True
        while more and not self.stopping.is_set():
            recipients: list[Recipient] = await retry_transient(
                60, what="reading an audience chunk"
            )(self.store.fanout.chunk_audience, chunk, cursor, self.batch_size)
            if not recipients:
                return
            cursor = recipients[-1].user_id
            # A short page was the chunk's last, and so was one that reached its last user: the
            # chunk ends without a round trip to read nothing.
            more = len(recipients) == self.batch_size and cursor != chunk.last_user
            try:
                async for attempt in retry_transient(60, what="claiming a batch"):
                    with attempt:
                        async with self.store.fanout.chunk_batch(
                            chunk, self.replica_id, cursor
                        ) as conn:
                            dues, claims = await self._adapted_batch(
                                active, conn, recipients, self.clock(), report, when
                            )
            except Fenced as why:
                log.info("chunk %d stops: %s", chunk.id, why, extra={"plan_id": chunk.plan_id})
                yield None
                return
            yield dues, claims
        if self.stopping.is_set():
            yield None  # stopping: the chunk is let go, another replica continues it

    async def _chunk_missed(self, active: ActivePlan, chunk: Chunk, report: FanOutReport) -> bool:
        """The chunk comes too late (the daemon was down past the plan's grace): its users
        without a ledger row get `missed`, so nothing is dropped silently. False: fenced."""
        try:
            async with self.store.fanout.chunk_batch(
                chunk, self.replica_id, chunk.last_user or chunk.cursor
            ) as conn:
                missed = await self.store.fanout.record_chunk_missed(
                    conn, chunk, active.record.version, self.replica_id
                )
        except Fenced:
            return False
        report.missed += missed
        metrics.count(active.record.id, Outcome.MISSED, Reason.GRACE_EXCEEDED, missed)
        return True

    async def _occurrence_done(self, active: ActivePlan, chunk: Chunk) -> None:
        """The last chunk of an occurrence is done: log it, and the plan's last occurrence (by
        count or end date) completes the plan."""
        counts = await self.store.fanout.occurrence_counts(chunk.plan_id, chunk.occurrence)
        log.info(
            "plan %s step %d fanned out: %s",
            chunk.plan_id,
            chunk.step,
            counts,
            extra={"plan_id": chunk.plan_id, "occurrence": chunk.occurrence},
        )
        cal = active.plan.schedule.calendar
        assert cal is not None
        anchor = calendar_anchor(cal, active.record.registered_at)
        if calendar_trigger(cal, anchor, chunk.fire_time + timedelta(microseconds=1)) is None:
            try:
                await self.lifecycle.complete(
                    chunk.plan_id,
                    actor=self.replica_id,
                    reason=f"all {chunk.step} occurrences are due",
                )
            except LifecycleError as refused:  # cancelled or paused meanwhile: that state stays
                log.info("plan %s not completed: %s", chunk.plan_id, refused.message)

    # --- relative plans -------------------------------------------------------------------------

    async def sweep(self, active: ActivePlan) -> FanOutReport:
        """Send every step of a relative plan that is due now, oldest first."""
        rule = active.plan.schedule.relative
        assert rule is not None
        grace = active.plan.schedule.grace.as_timedelta()
        report = FanOutReport()
        plan_id = active.record.id

        async def batches() -> AsyncIterator[tuple[list[Due], list[Claim] | None]]:
            while not self.stopping.is_set():
                now = self.clock()
                async with self.store.due_enrollments(plan_id, now, self.batch_size) as (conn, due):
                    # Held: a pause waits for this batch, and no batch starts after it.
                    state = await self.store.plan_state_held(conn, plan_id)
                    if state is None or not PlanState(state).fires or not due:
                        break
                    late = [r for r in due if now - _next_due(r) > grace]
                    await self.store.skip(
                        plan_id=plan_id,
                        version=active.record.version,
                        replica=self.replica_id,
                        rows=[
                            (_step_key(r), r.user_id, r.next_step + 1, _next_due(r)) for r in late
                        ],
                        status=Outcome.MISSED,
                        reason=Reason.GRACE_EXCEEDED,
                        conn=conn,
                    )
                    report.missed += len(late)
                    metrics.count(plan_id, Outcome.MISSED, Reason.GRACE_EXCEEDED, len(late))
                    on_time = [r for r in due if now - _next_due(r) <= grace]
                    dues, claims = await self._adapted_batch(
                        active, conn, on_time, now, report, _relative_step
                    )
                    await self.store.advance_enrollments(
                        conn,
                        plan_id,
                        [r.user_id for r in due],
                        [r.next_step + 1 for r in due],
                        [
                            relative_due(rule, r.start_at, ZoneInfo(r.tz), r.next_step + 1)
                            for r in due
                        ],
                    )
                # Sends start only after the claim and the advance have committed.
                yield dues, claims
            else:
                return  # stopping
            if state is None or not PlanState(state).fires:
                yield [], None

        await self._pipeline(active, batches(), report)
        return report

    async def _adapted_batch(
        self,
        active: ActivePlan,
        conn: Any,
        recipients: list[Recipient],
        now: datetime,
        report: FanOutReport,
        when: When,
    ) -> tuple[list[Due], list[Claim]]:
        """Render, gate and claim one batch, with the plan's adapt rules: the steps they skip
        are recorded, the extra steps they send are claimed after the plan's own steps (so they
        meet the caps those counted) and returned with them, as one batch (a user may have two
        rows: each claim says which), so that all of it is queued together."""
        adapted = await self._adapt(active, conn, recipients, now, report, when)
        dues = await self._render_all(
            active,
            [r for r in recipients if not _skips(adapted.get(r.user_id))],
            report,
            when,
            conn=conn,
        )
        claims = await self._claim(conn, active, dues)
        senders = {user: a for user, a in adapted.items() if a.send is not None}
        extras = await self._render_all(
            active,
            [r for r in recipients if r.user_id in senders],
            report,
            when,
            conn=conn,
            extras=senders,
        )
        if not extras:
            return dues, claims
        extra_claims = await self._claim(conn, active, extras)
        return dues + extras, _of_rows(claims, dues) + _of_rows(extra_claims, extras)

    async def _adapt(
        self,
        active: ActivePlan,
        conn: Any,
        recipients: list[Recipient],
        now: datetime,
        report: FanOutReport,
        when: When,
    ) -> dict[str, Adaptation]:
        """The plan's adapt rules on a batch of due users (docs/plans.md#adapt): what each user
        did is read in one query, the first matching rule decides, and the steps it skips are
        recorded `skipped` (reason `adapted`, the rule in the detail). Returns the decisions."""
        rules, record = active.plan.adapt, active.record
        if not rules or not recipients:
            return {}
        seen = await self.store.activity.last_seen(conn, [r.user_id for r in recipients], now)
        adapted = {
            r.user_id: a
            for r in recipients
            if (a := decide(rules, seen.get(r.user_id, NEVER_SEEN), now)) is not None
        }
        skipped = [r for r in recipients if _skips(adapted.get(r.user_id))]
        await self.store.skip(
            plan_id=record.id,
            version=record.version,
            replica=self.replica_id,
            rows=[(key, r.user_id, step, due) for r in skipped for key, step, due, _ in [when(r)]],
            status=Outcome.SKIPPED,
            reason=Reason.ADAPTED,
            conn=conn,
            details=[adapted[r.user_id].detail for r in skipped],
        )
        for _ in skipped:
            report.stopped_by_gate(Outcome.SKIPPED, Reason.ADAPTED)
        metrics.count(record.id, Outcome.SKIPPED, Reason.ADAPTED, len(skipped))
        return adapted

    # --- deferred sends ---------------------------------------------------------------------------

    async def retry_deferred(self, plan_id: str) -> FanOutReport:
        """Take the plan's deferred sends whose moment has come through the gate again: they go,
        are deferred again, or are skipped (their max_delay ran out, e.g. during a pause)."""
        report = FanOutReport()
        active = await self.load(plan_id)
        # A completed plan's last occurrence may have sends deferred past its completion.
        if active is None or not active.record.state.sends:
            report.stopped = True
            return report
        if self.stopping.is_set():
            report.stopped = True
            return report
        max_delay = active.plan.delivery.max_delay.as_timedelta()

        async def batches() -> AsyncIterator[tuple[list[Due], list[Claim] | None]]:
            while not self.stopping.is_set():
                now = self.clock()
                async with self.store.due_deferrals(plan_id, now, self.batch_size) as (conn, rows):
                    if not rows:
                        return
                    # One row per user a batch: every cap counter is per user, and a counter
                    # with room for one of two rows of one batch would refuse both. The others
                    # stay deferred and due, for the next batch.
                    rows = list({row.recipient.user_id: row for row in reversed(rows)}.values())
                    dues = [self._retry(active.plan, row, now, max_delay) for row in rows]
                    claims = await self._claim(conn, active, dues)
                # Every row was locked by us and still deferred: no claim means the plan stopped.
                yield dues, claims or None

        await self._pipeline(active, batches(), report)
        return report

    def _retry(self, plan: Plan, row: DeferredDelivery, now: datetime, max_delay: timedelta) -> Due:
        message = {k: str(v) for k, v in row.message.items()}
        if not row.enrolled:
            why = Stop(Outcome.SKIPPED, Reason.ENROLLMENT_STOPPED, "the user's timeline stopped")
        elif now - row.due_at > max_delay:
            why = Stop(
                Outcome.SKIPPED,
                Reason.DEFER_EXPIRED,
                f"still held {now - row.due_at} after its due time, past max_delay "
                f"{plan.delivery.max_delay}",
            )
        else:
            return self._gate(
                plan, row.occurrence, row.recipient, row.step, row.due_at, message, now, {}
            )
        return Due(row.occurrence, row.recipient.user_id, row.step, row.due_at, message, why)

    # --- shared machinery -----------------------------------------------------------------------

    async def _render_all(
        self,
        active: ActivePlan,
        recipients: list[Recipient],
        report: FanOutReport,
        when: When,
        conn: Any = None,
        *,
        extras: Mapping[str, Adaptation] | None = None,
    ) -> list[Due]:
        """Render each recipient's message, or (given `extras`) the extra step its adapt rule
        sends: that has its own ledger key (`extra_occurrence`), so it goes at most once per
        inactivity period, and the variant `extra:NAME` (its own line in reports). A message
        that cannot be rendered is recorded as skipped."""
        dues, broken = [], []
        now = self.clock()  # a batch is judged at one moment
        moments: dict[tuple[Any, ...], Decision] = {}
        for recipient in recipients:
            occurrence, step, due_at, tz = when(recipient)
            extra = None
            if extras is not None:
                adaptation = extras[recipient.user_id]
                extra = adaptation.send
                assert extra is not None
                occurrence = extra_occurrence(extra, adaptation, step)
                variant: str | None = f"extra:{extra}"
            else:
                # The user's variant of the step, the same on every replica and after a
                # restart; the claim writes it into the ledger row (a deferred row keeps it).
                variant = variant_for(active.plan, step, recipient.user_id)
            try:
                data = render(
                    active.plan,
                    step,
                    due_at,
                    tz,
                    recipient.user_id,
                    recipient.vars,
                    None if extra else variant,
                    extra=extra,
                )
            except RenderError as exc:
                log.warning(
                    "plan %s: cannot render %s for %s: %s",
                    active.record.id,
                    f"extra step {extra}" if extra else f"step {step}",
                    recipient.user_id,
                    exc,
                    extra={"plan_id": active.record.id},
                )
                broken.append((occurrence, recipient.user_id, step, due_at))
                continue
            due = self._gate(active.plan, occurrence, recipient, step, due_at, data, now, moments)
            dues.append(due if variant is None else replace(due, variant=variant))
        report.unrenderable += len(broken)
        metrics.count(active.record.id, Outcome.SKIPPED, Reason.UNRENDERABLE, len(broken))
        await self.store.skip(
            plan_id=active.record.id,
            version=active.record.version,
            replica=self.replica_id,
            rows=broken,
            status=Outcome.SKIPPED,
            reason=Reason.UNRENDERABLE,
            conn=conn,
        )
        return dues

    def _gate(
        self,
        plan: Plan,
        occurrence: str,
        recipient: Recipient,
        step: int,
        due_at: datetime,
        data: dict[str, str],
        now: datetime,
        moments: dict[tuple[Any, ...], Decision],
    ) -> Due:
        """Gate steps 4-6 on the rendered message, at `now`, in the user's own time zone; step
        7's counters are counted by the claim, atomically. Step 6 and the counters depend on the
        user only through the zone (and a limit key's value): `moments` keeps them per batch."""
        user = recipient.user_id
        stop = self._message_violation(plan, data)
        if stop is not None:
            return Due(occurrence, user, step, due_at, data, _stop(Outcome.SKIPPED, stop))
        held = self._quota_stop(plan, due_at)
        if held is not None:
            return Due(occurrence, user, step, due_at, data, held)
        key_value = limit_key_value(plan, recipient.vars, data)
        moment = (recipient.tz, due_at, key_value)
        decision = moments.get(moment)
        if decision is None:
            decision = moments[moment] = moment_decision(
                plan,
                self.policy,
                user=USER_SLOT,
                rendered=data,
                variables=recipient.vars,
                due_at=due_at,
                now=now,
                tz=ZoneInfo(recipient.tz),  # ZoneInfo keeps one instance per zone
                limits=self._limits(plan),
            )
        if decision.violation is None:
            counters = tuple(
                CapUse(c.key_for(user), c.limit, c.resets_at) for c in decision.counters
            )
            return Due(occurrence, user, step, due_at, data, None, counters)
        assert decision.outcome is not None
        return Due(
            occurrence,
            user,
            step,
            due_at,
            data,
            _stop(decision.outcome, decision.violation, decision.defer_until),
        )

    # --- WeChat's daily quota (errcode 45009) ----------------------------------------------------

    def _hold_for_quota(self, plan: Plan, due_at: datetime, detail: str | None) -> Stop:
        """WeChat says the day's quota is spent: stop sending until its reset (midnight in
        China) and put this send back for then (wechat-api.md §3)."""
        now = self.clock()
        if self.quota_held_until is None or self.quota_held_until <= now:
            self.quota_held_until = quota_reset_after(now)
            log.warning(
                "WeChat's daily send quota is spent (45009: %s): no sends until %s",
                detail,
                self.quota_held_until.isoformat(),
            )
        stop = self._quota_stop(plan, due_at)
        assert stop is not None
        return stop

    def _quota_stop(self, plan: Plan, due_at: datetime) -> Stop | None:
        """While the quota is spent (45009), or what is left of it is kept for plans of a higher
        priority (scheduler/app/quota.py), a send is deferred to its reset, or skipped if that is
        past the plan's max_delay (nothing is dropped silently)."""
        until, now = self.quota_held_until, self.clock()
        if until is not None and now < until:
            detail = f"WeChat's daily quota is spent until {until.isoformat()}"
        elif (short := self.quota.short_for(plan.delivery.priority)) is not None:
            until = quota_reset_after(now)
            detail = f"{short}, until {until.isoformat()}"
        else:
            return None
        decision = defer_or_skip(
            plan, Violation(Reason.QUOTA, "daily_quota", detail), True, until, due_at
        )
        assert decision.outcome is not None and decision.violation is not None
        return _stop(decision.outcome, decision.violation, decision.defer_until)

    def _limits(self, plan: Plan) -> Limits:
        key = (id(plan), id(self.policy), ("limits",))
        if key not in self._verdicts:
            self._verdicts[key] = (plan, self.policy, plan_limits(plan, self.policy))
        limits: Limits = self._verdicts[key][2]
        return limits

    def _message_violation(self, plan: Plan, data: dict[str, str]) -> Violation | None:
        """Steps 4-5 for a rendered message, remembered per (plan, policy, text): a fan-out to
        a million users mostly sends a handful of distinct texts."""
        key = (id(plan), id(self.policy), tuple(data.items()))
        if key not in self._verdicts:
            if len(self._verdicts) >= 10_000:
                self._verdicts.clear()
            self._verdicts[key] = (plan, self.policy, message_violation(plan, self.policy, data))
        violation: Violation | None = self._verdicts[key][2]
        return violation

    async def _claim(self, conn: Any, active: ActivePlan, dues: list[Due]) -> list[Claim]:
        if not dues:
            return []
        plan, record = active.plan, active.record
        batch = ClaimBatch(
            plan_id=record.id,
            version=record.version,
            template_id=plan.template.id,
            consent_kind=plan.consent.value,
            replica=self.replica_id,
            on_capped=plan.delivery.on_capped,
            max_delay=plan.delivery.max_delay.as_timedelta(),
        )
        return await self.store.claim(conn, batch, dues)

    async def _pipeline(
        self,
        active: ActivePlan,
        batches: AsyncIterator[tuple[list[Due], list[Claim] | None]],
        report: FanOutReport,
        *,
        keyed_by_delivery: bool = False,
    ) -> None:
        """Send the allowed claims of each batch with `concurrency` workers; every send is
        authorized by the flight recorder before it leaves. A batch of None claims (the plan
        stopped, or the work was let go) ends the intake; what was queued still goes."""
        plan = active.plan
        template, kind = plan.template.id, plan.consent.value
        tracked_page = page_tracker(plan.template.page)
        queue: asyncio.Queue[tuple[int, Due, OutgoingMessage] | None] = asyncio.Queue(
            maxsize=self.batch_size * 2
        )

        halt: Stop | None = None  # a result concerned more than its send (damage.py)

        async def send(delivery_id: int, due: Due, message: OutgoingMessage) -> None:
            nonlocal halt
            await self.quota.refresh()
            held, errcode = halt or self._quota_stop(plan, due.due_at), None
            sent = held is None  # else the quota ran out while this send waited in the queue
            if sent:
                self.quota.spent()  # counted before it goes: concurrent sends see it at once
                if self.stopping.is_set() or not await self.recorder.authorize(delivery_id):
                    # Stopping: the row goes back to the pool when this replica lets go.
                    report.withdrawn += 1  # a recovery gave it back to the pool meanwhile
                    return
                started = time.perf_counter()
                result = await self.channel.send(message)
                if result.reason != Reason.QUOTA:
                    metrics.observe_send(
                        active.record.id,
                        due.occurrence,
                        message.touser,
                        result,
                        time.perf_counter() - started,
                    )
                    if result.outcome == Outcome.SENT:
                        report.sent += 1
                    elif result.outcome == Outcome.UNKNOWN and plan.delivery.resend_unknown:
                        report.resent += 1  # the plan prefers a possible duplicate to a miss
                        result = _given_back(result)
                    else:
                        report.failed += 1
                    self.recorder.finished(
                        template, kind, _finished(delivery_id, result), sent=True
                    )
                    if scope_of(result) is not None:
                        halt = await self.damage.stop(plan, message.touser, result) or halt
                    return
                held, errcode = self._hold_for_quota(plan, due.due_at, result.detail), 45009
            assert held is not None  # not sent: the gate or the quota held it
            report.stopped_by_gate(held.status, held.reason)
            metrics.count(active.record.id, held.status, held.reason)
            self.recorder.finished(template, kind, _held(delivery_id, held, errcode), sent=sent)

        async def worker() -> None:
            while (item := await queue.get()) is not None:
                try:
                    await send(*item)
                finally:
                    self._queued.discard(item[0])

        await self.quota.refresh()  # before the first batch meets the gate
        workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
        self._running += 1
        self._idle.clear()
        try:
            try:
                async for dues, claims in batches:
                    if claims is None:
                        report.stopped = True
                        break
                    by_user = {d.user_id: d for d in dues}
                    by_row = {(d.user_id, d.occurrence): d for d in dues}
                    pairs = (
                        zip(claims, dues, strict=True)
                        if keyed_by_delivery
                        else (
                            (
                                c,
                                by_user[c.user_id]
                                if c.occurrence is None
                                else by_row[(c.user_id, c.occurrence)],
                            )
                            for c in claims
                        )
                    )
                    report.claimed += len(claims)
                    report.already_claimed += len(dues) - len(claims)
                    for c, due in pairs:
                        if not c.allowed:
                            report.stopped_by_gate(c.status, c.reason)
                            metrics.count(active.record.id, c.status, c.reason)
                            continue
                        page = tracked_page(c.delivery_id)
                        message = OutgoingMessage(c.user_id, template, due.data, page)
                        self._queued.add(c.delivery_id)
                        await queue.put((c.delivery_id, due, message))
                    if self.stopping.is_set():
                        report.stopped = True
                        break
            except Exception:  # the database failed past its retries: stop taking batches,
                # but what was claimed still goes (nothing is left pending under a live replica)
                log.exception("plan %s: taking the next batch failed", active.record.id)
                report.stopped = True
            for _ in workers:
                await queue.put(None)
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            # Results already in hand are written even when the fan-out is cancelled.
            await asyncio.shield(self.recorder.flush())
            self._running -= 1
            if not self._running:
                self._idle.set()


def occurrence_key(fire_time: datetime) -> str:
    """The ledger's occurrence key of a calendar fire: its scheduled time, in UTC."""
    return fire_time.astimezone(UTC).isoformat()


def _stop(outcome: Outcome, violation: Violation, defer_until: datetime | None = None) -> Stop:
    return Stop(outcome, violation.reason, violation.detail, defer_until)


def _of_rows(claims: list[Claim], dues: list[Due]) -> list[Claim]:
    """The claims of one claim call (one row per user), each told which row it is."""
    occurrence = {d.user_id: d.occurrence for d in dues}
    return [replace(c, occurrence=occurrence[c.user_id]) for c in claims]


def _skips(adaptation: Adaptation | None) -> bool:
    return adaptation is not None and adaptation.skip


def _relative_step(r: Recipient) -> tuple[str, int, datetime, ZoneInfo]:
    """A due enrolment's next step: its key, number, due time and the user's zone."""
    return _step_key(r), r.next_step + 1, _next_due(r), ZoneInfo(r.tz)


def _step_key(recipient: Recipient) -> str:
    return f"step-{recipient.next_step + 1}"


def _next_due(recipient: Recipient) -> datetime:
    """When a due enrolment's next step is due (`due_enrollments` reads no other)."""
    assert recipient.next_due_at is not None
    return recipient.next_due_at


def _held(delivery_id: int, stop: Stop, errcode: int | None = None) -> Finished:
    return Finished(
        delivery_id, stop.status, stop.reason, errcode, None, stop.detail, stop.defer_until
    )


def _given_back(result: SendResult) -> SendResult:
    """An unknown result turned into "send it again": the row goes back to the pool pending."""
    detail = f"sent again after {result.reason}: {result.detail}"
    return SendResult(Outcome.PENDING, None, detail=detail)


def _finished(delivery_id: int, result: SendResult) -> Finished:
    return Finished(
        delivery_id,
        result.outcome,
        result.reason,
        result.errcode,
        result.msgid,
        result.detail,
    )
