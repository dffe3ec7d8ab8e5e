"""The engagement guard (docs/engagement.md, "The guard"): a plan whose recent deliveries drew a
cancellation rate over the policy's limit, or a spike against the plan's own baseline, pauses
itself, like damage control does on a refused template (`scheduler/app/damage.py`): through
`Lifecycle.pause` with actor `engagement`, a reason with the figures, an audit row carrying them,
NOTIFY, a status line and a metric. An admin resumes it.

The daemon runs `check` every sweep period (`REMINDERS_SWEEP_SECONDS`), on one replica at a
time, for the active plans with sends in the recent window only: the counts cost one query per
such plan (the attribution of cancellations), never one per send. The verdict is
`scheduler.domain.engagement.judge`; the counts and their attribution `store.engagement`.

After a resume the same old cancellations do not pause the plan again: the deliveries an
automatic pause judged (due from its window's start to the pause, `judged_from`/`judged_to` in
its audit row) are left out of every later check, the recent window and the baseline alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from scheduler.app import metrics
from scheduler.app.lifecycle import ActionResult, Lifecycle, LifecycleError
from scheduler.domain.engagement import GuardFigures, Verdict, judge, pause_reason
from scheduler.domain.policy import Guard, Policy
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

ACTOR = "engagement"


@dataclass(frozen=True, slots=True)
class Judged:
    """One plan's verdict with what it judged: the figures and the span of due times."""

    plan_id: str
    verdict: Verdict
    observed: GuardFigures
    since: datetime
    recent_from: datetime
    until: datetime


async def judge_plan(
    store: Store, plan_id: str, guard: Guard, *, now: datetime, window: timedelta
) -> Judged:
    """The guard's verdict on one plan's deliveries due in the recent window before `now`
    (against those of the baseline window before it), cancellations attributed within
    `window`, leaving out what earlier automatic pauses judged."""
    recent_from = now - guard.recent_window.as_timedelta()
    since = recent_from - guard.baseline_window.as_timedelta()
    spans = await store.engagement.judged_spans(plan_id, actor=ACTOR, since=since)
    rows = await store.engagement.guard_counts(
        plan_id, since=since, recent_from=recent_from, until=now, window=window, leave_out=spans
    )
    observed = GuardFigures.from_rows(rows)
    return Judged(plan_id, judge(observed, guard), observed, since, recent_from, now)


class EngagementGuard:
    """Pauses the plans whose cancellations the policy's guard thresholds say to."""

    def __init__(self, store: Store, lifecycle: Lifecycle, *, policy: Callable[[], Policy]) -> None:
        self.store = store
        self.lifecycle = lifecycle
        self.policy = policy  # the gate's current policy (replaced when policy.yaml changes)

    async def check(self) -> list[ActionResult]:
        """Judge every active plan with sends in its recent window; pause those the verdict
        says to. Returns the pauses."""
        now = self.lifecycle.clock()
        policy = self.policy()
        window = policy.engagement.attribution_window.as_timedelta()
        longest = max(
            [policy.guard_for(p).recent_window.as_timedelta() for p in policy.exceptions]
            + [policy.engagement.recent_window.as_timedelta()]
        )
        paused = []
        for plan_id in await self.store.engagement.guarded_plans(now - longest, now):
            guard = policy.guard_for(plan_id)
            if not guard.auto_pause:
                continue
            judged = await judge_plan(self.store, plan_id, guard, now=now, window=window)
            if judged.verdict.pause:
                result = await self._pause(judged, guard)
                if result is not None:
                    paused.append(result)
        return paused

    async def _pause(self, judged: Judged, guard: Guard) -> ActionResult | None:
        verdict, observed = judged.verdict, judged.observed
        reason = pause_reason(verdict, observed, guard)
        details = {
            "rule": verdict.rule,
            "sent": observed.recent.sent,
            "cancelled": observed.recent.cancelled,
            "baseline_sent": observed.baseline.sent,
            "baseline_cancelled": observed.baseline.cancelled,
            "judged_from": judged.recent_from.isoformat(),
            "judged_to": judged.until.isoformat(),
        }
        try:
            result = await self.lifecycle.pause(
                judged.plan_id, actor=ACTOR, reason=reason, details=details
            )
        except LifecycleError as exc:  # paused or cancelled meanwhile
            log.debug("plan %s: %s", judged.plan_id, exc)
            return None
        assert verdict.rule is not None  # a pause has its rule
        metrics.ENGAGEMENT_PAUSES.labels(judged.plan_id, verdict.rule).inc()
        log.error(
            "plan %s paused: %s",
            judged.plan_id,
            reason,
            extra={"plan_id": judged.plan_id, "rule": verdict.rule, **details},
        )
        return result
