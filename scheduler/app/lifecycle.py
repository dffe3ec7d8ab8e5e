"""Admin actions on plans and users: pause, resume, cancel, complete, opt-out/in, stop enrolment.

One service for the CLI, the HTTP API and the plan-file watcher. Every plan action runs in one
transaction holding the plan row `FOR UPDATE`, so two admins acting at once are serialised and the
second sees the first's result; the allowed transitions are the table `TRANSITIONS`; every action
appends to `plan_events` (who, when, why, the plan version) in the same transaction, and a refused
action changes nothing.

Resuming a calendar plan works out the occurrences the pause held back from the plan's own
schedule maths (the same triggers APScheduler fires), keyed exactly as a fire would key them:

- skip (the default): they are recorded `skipped` (reason `paused`) for the audience;
- catch-up: those still within the plan's grace are queued in `catch_up`, which a daemon replica
  fans out (or records `missed` if the grace ran out meanwhile); older ones are recorded `missed`
  (reason `grace_exceeded`).

A relative plan's enrolments keep their progress while paused. Resuming with skip records each
overdue step `skipped` (`paused`) and moves the enrolment to its first step due after now; with
catch-up the next sweep sends the overdue steps still within grace and records the rest missed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from scheduler.app import metrics
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import Plan
from scheduler.domain.schedule import (
    MAX_ENUMERATED_STEPS,
    calendar_anchor,
    calendar_occurrences,
    calendar_step,
    calendar_trigger,
    relative_due,
)
from scheduler.errors import RemindersError
from scheduler.store import lifecycle as sql
from scheduler.store.lifecycle import Conn
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

FILE_REMOVED = "file removed"
FILE_RESTORED = "file restored"
ALL_PLANS = "*"

# action -> {state it may start from: state it leads to}. Anything else is refused.
TRANSITIONS: dict[str, dict[str, str]] = {
    "pause": {"active": "paused"},
    "resume": {"paused": "active"},
    "cancel": {"active": "cancelled", "paused": "cancelled"},
    "complete": {"active": "completed"},
}
REASON_REQUIRED = {"pause", "cancel", "opt_out", "stop_enrollment"}


class LifecycleError(RemindersError):
    """An action refused: nothing was changed. `code` says why (api/ maps it to an HTTP
    status), `message` says it to a person."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class ActionResult:
    action: str
    plan_id: str | None
    user_id: str | None
    state: str | None  # the plan's state after the action
    previous_state: str | None
    version: int | None
    event_id: int
    at: datetime
    actor: str
    reason: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "plan_id": self.plan_id,
            "user_id": self.user_id,
            "state": self.state,
            "previous_state": self.previous_state,
            "version": self.version,
            "event_id": self.event_id,
            "at": self.at.isoformat(),
            "actor": self.actor,
            "reason": self.reason,
            "details": self.details,
        }


def utc_now() -> datetime:
    return datetime.now(UTC)


def _reason(action: str, reason: str | None) -> str | None:
    reason = reason.strip() if reason else None
    if action in REASON_REQUIRED and not reason:
        raise LifecycleError(
            "reason_required",
            f"{action.replace('_', ' ')} needs a reason (it goes into the audit log)",
        )
    return reason


def _refusal(plan_id: str, action: str, row: Any) -> LifecycleError:
    state, why = row["state"], f" ({row['state_reason']})" if row["state_reason"] else ""
    if state == "cancelled":
        text = f"plan {plan_id} is cancelled{why}; cancelling is final, so it cannot {action}"
    elif state == "completed":
        text = f"plan {plan_id} has completed{why}: it has no occurrence left to {action}"
    elif action == "pause":
        text = f"plan {plan_id} is already paused{why}"
    elif action == "resume":
        text = f"plan {plan_id} is {state}, not paused: there is nothing to resume"
    else:
        text = f"plan {plan_id} is {state}: it cannot {action}"
    return LifecycleError("invalid_transition", text)


class Lifecycle:
    def __init__(self, store: Store, *, clock: Callable[[], datetime] = utc_now):
        self.store = store
        self.clock = clock

    # --- plans ----------------------------------------------------------------------------------

    async def pause(
        self,
        plan_id: str,
        *,
        actor: str,
        reason: str | None,
        details: dict[str, Any] | None = None,
    ) -> ActionResult:
        """No new occurrence starts; a fan-out in progress stops at its next batch. `details`
        go into the audit row (e.g. the figures an automatic pause judged)."""
        return await self._transition(plan_id, "pause", actor, reason, extra=details)

    async def resume(
        self, plan_id: str, *, actor: str, reason: str | None = None, catch_up: bool = False
    ) -> ActionResult:
        """Resume a paused plan, skipping what the pause held back (default) or catching up
        what is still within the plan's grace window (the rest is recorded missed)."""
        return await self._transition(plan_id, "resume", actor, reason, catch_up=catch_up)

    async def cancel(self, plan_id: str, *, actor: str, reason: str | None) -> ActionResult:
        """Final: nothing more is sent; the ledger and the enrolments are kept."""
        return await self._transition(plan_id, "cancel", actor, reason)

    async def complete(self, plan_id: str, *, actor: str, reason: str | None) -> ActionResult:
        return await self._transition(plan_id, "complete", actor, reason)

    async def _transition(
        self,
        plan_id: str,
        action: str,
        actor: str,
        reason: str | None,
        *,
        catch_up: bool = False,
        extra: dict[str, Any] | None = None,
    ) -> ActionResult:
        reason = _reason(action, reason)
        now = self.clock()
        async with self.store.lifecycle.transaction() as conn:
            row = await sql.locked_plan(conn, plan_id)
            if row is None:
                raise LifecycleError("unknown_plan", f"no plan {plan_id!r} is loaded")
            target = TRANSITIONS[action].get(row["state"])
            if target is None:
                raise _refusal(plan_id, action, row)
            details: dict[str, Any] = dict(extra or {})
            if action == "resume":
                details, target = await self._resume_backlog(conn, plan_id, row, now, catch_up)
            elif action == "cancel":
                dropped = len(await sql.take_catch_ups(conn, plan_id))
                if dropped:
                    details["catch_up_dropped"] = dropped
                # Fan-outs under way stop: nothing more is claimed.
                closed = await self.store.fanout.close_occurrences(conn, plan_id)
                if closed:
                    details["occurrences_closed"] = closed
                # Deferred sends were waiting for a moment the rules allow: they end here, and
                # so do rows claimed but given back to the pool after a crash.
                deferred, given_back = await sql.skip_cancelled(conn, plan_id)
                if deferred:
                    details["deferred_skipped"] = deferred
                if given_back:
                    details["given_back_skipped"] = given_back
            await sql.set_state(conn, plan_id, target, reason, now)
            result = await self._event(
                conn,
                action=action,
                plan_id=plan_id,
                user_id=None,
                actor=actor,
                reason=reason,
                version=row["current_version"],
                details=details,
                state=target,
                previous=row["state"],
                now=now,
            )
            await self.store.lifecycle.notify(
                conn, {"kind": "state", "plan": plan_id, "state": target}
            )
        log.info(
            "plan %s: %s by %s (%s) -> %s",
            plan_id,
            action,
            actor,
            reason or "no reason given",
            target,
            extra={"plan_id": plan_id, "action": action, "actor": actor, **details},
        )
        return result

    async def _resume_backlog(
        self,
        conn: Conn,
        plan_id: str,
        row: Any,
        now: datetime,
        catch_up: bool,
    ) -> tuple[dict[str, Any], str]:
        """Settle what the pause held back; returns the event details and the state to enter."""
        plan = Plan.model_validate(row["definition"])
        version = row["current_version"]
        paused_at = row["paused_at"] or now
        grace = plan.schedule.grace.as_timedelta()
        details: dict[str, Any] = {"mode": "catch_up" if catch_up else "skip"}
        if plan.schedule.relative is not None:
            if not catch_up:
                details["skipped_steps"] = await self._skip_overdue_steps(conn, plan, version, now)
            return details, "active"

        cal = plan.schedule.calendar
        assert cal is not None
        anchor = calendar_anchor(cal, row["registered_at"])
        held: list[tuple[int, datetime]] = []
        for occurrence, _ in zip(
            calendar_occurrences(cal, anchor), range(MAX_ENUMERATED_STEPS), strict=False
        ):
            if occurrence.due_at > now:
                break
            if occurrence.due_at <= paused_at - grace:
                continue
            # Before the pause but within grace: only a fan-out the pause stopped midway.
            if occurrence.due_at < paused_at and not await sql.stopped_midway(
                conn, plan_id, _key(occurrence.due_at)
            ):
                continue
            held.append((occurrence.step, occurrence.due_at))
        queued, skipped, missed = [], [], []
        for step, due_at in held:
            if catch_up and now - due_at <= grace:
                await sql.queue_catch_up(conn, plan_id, due_at)
                queued.append(due_at.isoformat())
            elif catch_up:
                await _record_for_audience(
                    conn, plan_id, version, step, due_at, Outcome.MISSED, Reason.GRACE_EXCEEDED, now
                )
                missed.append(due_at.isoformat())
            else:
                await _record_for_audience(
                    conn, plan_id, version, step, due_at, Outcome.SKIPPED, Reason.PAUSED, now
                )
                skipped.append(due_at.isoformat())
        if not catch_up:
            # Catch-ups queued by an earlier resume and stopped by this pause: skipped too.
            for fire_time in await sql.take_catch_ups(conn, plan_id):
                fire_step = calendar_step(cal, anchor, fire_time)
                if fire_step is not None:
                    await _record_for_audience(
                        conn,
                        plan_id,
                        version,
                        fire_step,
                        fire_time,
                        Outcome.SKIPPED,
                        Reason.PAUSED,
                        now,
                    )
                    skipped.append(fire_time.isoformat())
        details.update(caught_up=queued, skipped=skipped, missed=missed)
        if not queued and calendar_trigger(cal, anchor, now) is None:
            return details, "completed"
        if queued:
            await self.store.lifecycle.notify(conn, {"kind": "catch_up", "plan": plan_id})
        return details, "active"

    async def _skip_overdue_steps(self, conn: Conn, plan: Plan, version: int, now: datetime) -> int:
        rule = plan.schedule.relative
        assert rule is not None
        rows = await sql.overdue_enrolments(conn, plan.id, now)
        skipped: list[tuple[str, str, int, datetime]] = []
        users, steps, dues = [], [], []
        for r in rows:
            index, due = r["next_step"], r["next_due_at"]
            while due is not None and due <= now:
                skipped.append((f"step-{index + 1}", r["user_id"], index + 1, due))
                index += 1
                due = relative_due(rule, r["start_at"], ZoneInfo(r["tz"]), index)
            users.append(r["user_id"])
            steps.append(index)
            dues.append(due)
        if rows:
            await Store.advance_enrollments(conn, plan.id, users, steps, dues)
            await self.store.skip(
                plan_id=plan.id,
                version=version,
                replica="resume",
                rows=skipped,
                status=Outcome.SKIPPED,
                reason=Reason.PAUSED,
                conn=conn,
            )
            metrics.count(plan.id, Outcome.SKIPPED, Reason.PAUSED, len(skipped))
        return len(skipped)

    # --- users ----------------------------------------------------------------------------------

    async def opt_out(
        self, user_id: str, *, plan_id: str | None, actor: str, reason: str | None
    ) -> ActionResult:
        """Stop every send to the user from one plan (or all: plan_id None) until opted back in.
        Enrolments keep going, recording each due send `skipped` (`opted_out`)."""
        reason = _reason("opt_out", reason)
        scope = plan_id or ALL_PLANS
        async with self.store.lifecycle.transaction() as conn:
            version = await self._plan_version(conn, plan_id)
            existing = await sql.opt_out_of(conn, user_id, scope)
            if existing is not None:
                raise LifecycleError(
                    "already_opted_out",
                    f"user {user_id} is already opted out of {_scope_text(plan_id)} (since "
                    f"{existing['created_at']:%Y-%m-%d %H:%M} UTC, by {existing['actor']})",
                )
            await sql.add_opt_out(conn, user_id, scope, actor, reason)
            return await self._event(
                conn,
                action="opt_out",
                plan_id=plan_id,
                user_id=user_id,
                actor=actor,
                reason=reason,
                version=version,
                now=self.clock(),
            )

    async def opt_in(
        self, user_id: str, *, plan_id: str | None, actor: str, reason: str | None = None
    ) -> ActionResult:
        """Undo an opt-out of one plan (or of all plans: plan_id None)."""
        reason = _reason("opt_in", reason)
        scope = plan_id or ALL_PLANS
        async with self.store.lifecycle.transaction() as conn:
            version = await self._plan_version(conn, plan_id)
            if not await sql.remove_opt_out(conn, user_id, scope):
                everywhere = (
                    plan_id is not None
                    and await sql.opt_out_of(conn, user_id, ALL_PLANS) is not None
                )
                hint = " (but is opted out of every plan: opt in without a plan)"
                raise LifecycleError(
                    "not_opted_out",
                    f"user {user_id} is not opted out of {_scope_text(plan_id)}"
                    + (hint if everywhere else ""),
                )
            return await self._event(
                conn,
                action="opt_in",
                plan_id=plan_id,
                user_id=user_id,
                actor=actor,
                reason=reason,
                version=version,
                now=self.clock(),
            )

    async def stop_enrollment(
        self, plan_id: str, user_id: str, *, actor: str, reason: str | None
    ) -> ActionResult:
        """End one user's timeline in a plan; what was sent stays in the ledger. Enrolling the
        user again starts a new timeline."""
        reason = _reason("stop_enrollment", reason)
        async with self.store.lifecycle.transaction() as conn:
            version = await self._plan_version(conn, plan_id)
            status = await sql.enrolment_status(conn, plan_id, user_id)
            if status is None:
                raise LifecycleError(
                    "unknown_enrollment", f"user {user_id} is not enrolled in plan {plan_id}"
                )
            if status != "active":
                raise LifecycleError(
                    "invalid_transition",
                    f"the enrolment of {user_id} in plan {plan_id} is already {status}",
                )
            await sql.stop_enrolment(conn, plan_id, user_id)
            return await self._event(
                conn,
                action="stop_enrollment",
                plan_id=plan_id,
                user_id=user_id,
                actor=actor,
                reason=reason,
                version=version,
                now=self.clock(),
            )

    async def opt_outs(self, user_id: str) -> list[dict[str, Any]]:
        rows = await self.store.lifecycle.opt_outs(user_id)
        return [
            {
                "plan_id": None if r["plan_id"] == ALL_PLANS else r["plan_id"],
                "actor": r["actor"],
                "reason": r["reason"],
                "since": r["created_at"].isoformat(),
            }
            for r in rows
        ]

    # --- the audit trail ------------------------------------------------------------------------

    async def audit(
        self, *, plan_id: str | None = None, user_id: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest `limit` admin actions and plan-file changes, newest first."""
        rows = await self.store.lifecycle.audit(plan_id, user_id, limit)
        return [
            {
                "id": r["id"],
                "at": r["recorded_at"].isoformat(),
                "plan_id": r["plan_id"],
                "user_id": r["user_id"],
                "action": r["action"],
                "actor": r["actor"],
                "reason": r["reason"],
                "version": r["plan_version"],
                "details": r["details"] or {},
            }
            for r in rows
        ]

    async def record(
        self,
        action: str,
        *,
        actor: str,
        plan_id: str | None = None,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Append an event that is not a state change (e.g. a plan file rejected)."""
        async with self.store.lifecycle.connection() as conn:
            version = await self._plan_version(conn, plan_id, must_exist=False)
            await self._event(
                conn,
                action=action,
                plan_id=plan_id,
                user_id=None,
                actor=actor,
                reason=reason,
                version=version,
                details=details,
                now=self.clock(),
            )

    # --- helpers --------------------------------------------------------------------------------

    async def _plan_version(
        self, conn: Conn, plan_id: str | None, *, must_exist: bool = True
    ) -> int | None:
        if plan_id is None:
            return None
        version = await sql.plan_version(conn, plan_id)
        if version is None and must_exist:
            raise LifecycleError("unknown_plan", f"no plan {plan_id!r} is loaded")
        return version

    async def _event(
        self,
        conn: Conn,
        *,
        action: str,
        plan_id: str | None,
        user_id: str | None,
        actor: str,
        reason: str | None,
        version: int | None,
        now: datetime,
        details: dict[str, Any] | None = None,
        state: str | None = None,
        previous: str | None = None,
    ) -> ActionResult:
        row = await sql.add_event(
            conn,
            plan_id=plan_id,
            user_id=user_id,
            action=action,
            actor=actor,
            reason=reason,
            version=version,
            details=details or None,
            at=now,  # the service's clock: virtual in tests and simulations
        )
        return ActionResult(
            action=action,
            plan_id=plan_id,
            user_id=user_id,
            state=state,
            previous_state=previous,
            version=version,
            event_id=row["id"],
            at=row["recorded_at"],
            actor=actor,
            reason=reason,
            details=details or {},
        )


def _scope_text(plan_id: str | None) -> str:
    return f"plan {plan_id}" if plan_id else "every plan"


def _key(fire_time: datetime) -> str:
    """The ledger's occurrence key of a calendar fire (as the dispatcher writes it)."""
    return fire_time.astimezone(UTC).isoformat()


async def _record_for_audience(
    conn: Conn,
    plan_id: str,
    version: int,
    step: int,
    due_at: datetime,
    status: str,
    reason: str,
    now: datetime,
) -> int:
    """One final row per active enrolment that has none for this occurrence yet."""
    n = await sql.record_for_audience(
        conn, plan_id, version, _key(due_at), step, due_at, str(status), str(reason)
    )
    metrics.count(plan_id, status, reason, n)
    return n


async def process_catch_up(store: Store, dispatcher: Any, *, clock: Callable[[], datetime]) -> int:
    """Fan out the queued catch-up occurrences of active plans, oldest first; one replica takes
    each (an advisory lock while it fans out, which no admin action waits for: see
    `claim_catch_up`). Past its grace by now, an occurrence is recorded missed instead. Returns
    how many occurrences were handled."""
    handled = 0
    while True:
        async with store.lifecycle.connection() as conn:
            row = await sql.claim_catch_up(conn)
            if row is None:
                return handled
            plan_id, fire_time = row["plan_id"], row["fire_time"]
            try:
                active = await dispatcher.load(plan_id)
                stopped = False
                if active is not None:
                    grace: timedelta = active.plan.schedule.grace.as_timedelta()
                    if clock() - fire_time > grace:
                        await dispatcher.record_missed(plan_id, fire_time)
                    else:
                        log.info(
                            "plan %s: catching up the occurrence of %s",
                            plan_id,
                            fire_time.isoformat(),
                            extra={"plan_id": plan_id, "occurrence": _key(fire_time)},
                        )
                        stopped = (await dispatcher.fan_out(active, fire_time)).stopped
                if stopped:  # paused again midway: the next resume decides
                    return handled
                # Gone already when a resume or cancel settled it meanwhile.
                await sql.catch_up_done(conn, plan_id, fire_time)
                handled += 1
            finally:
                await sql.release_catch_up(conn, plan_id, fire_time)
