"""Prometheus metrics (prometheus_client, default registry) and the structured send log.

Counters and histograms are this process's own: the dispatcher and the channel call the
`observe_*` hooks below as things happen. Gauges that describe shared state (the due backlog,
plans by state, live replicas, broken plan files) are read from PostgreSQL when /metrics is
scraped, so every replica reports the same cluster-wide values for them.

    reminders_sends_total{plan,outcome,reason}   final outcomes this replica wrote to the ledger
    reminders_send_latency_seconds               one WeChat send, retries included
    reminders_wechat_errcodes_total{errcode}     every non-zero errcode WeChat answered
    reminders_engagement_pauses_total{plan,rule} plans the engagement guard paused (limit, spike)
    reminders_fire_lag_seconds{kind}             start of a fire minus its scheduled time
    reminders_due_backlog{plan,kind}             due work not yet done (see `refresh_gauges`)
    reminders_plans{state}, reminders_replicas_alive, reminders_plan_file_problems
    reminders_engagement{plan,window,figure}     sent / delivered / opened / cancelled, by due
                                                 time in the last 24h or 7d (docs/engagement.md)
    reminders_engagement_rate{plan,window,rate}  click_through / cancellation (none without sends)
                                                 (both read at most once a minute)
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from scheduler.domain.plan_state import PlanState

__all__ = ["CONTENT_TYPE_LATEST", "render"]

send_log = logging.getLogger("scheduler.sends")

SENDS = Counter(
    "reminders_sends",
    "Final delivery outcomes written to the ledger by this replica, by plan, outcome and reason.",
    ["plan", "outcome", "reason"],
)
SEND_LATENCY = Histogram(
    "reminders_send_latency_seconds",
    "Time of one WeChat send (token fetch and retries included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
WECHAT_ERRCODES = Counter(
    "reminders_wechat_errcodes",
    "Non-zero errcodes answered by WeChat (each attempt, retried ones included).",
    ["errcode"],
)
DAMAGE_STOPS = Counter(
    "reminders_damage_stops",
    "Errcodes acted on beyond their send (scheduler/app/damage.py): plans paused for a template,"
    " page or credential error, or a user's enrolments stopped for an invalid openid.",
    ["scope", "errcode"],
)
ENGAGEMENT_PAUSES = Counter(
    "reminders_engagement_pauses",
    "Plans the engagement guard paused (scheduler/app/engagement_guard.py), by plan and rule:"
    " limit (cancellation rate over the policy's limit) or spike (against the plan's baseline).",
    ["plan", "rule"],
)
FIRE_LAG = Histogram(
    "reminders_fire_lag_seconds",
    "How late a plan's fire started after its scheduled time.",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
DUE_BACKLOG = Gauge(
    "reminders_due_backlog",
    "Due work not done yet: steps = enrolment steps past due, catch_up = occurrences queued by "
    "a resume, in_flight = sends claimed and not yet answered.",
    ["plan", "kind"],
)
PLANS = Gauge("reminders_plans", "Plans by state.", ["state"])
FAN_OUTS = Gauge(
    "reminders_fanouts_running",
    "Calendar occurrences whose fan-out is under way (durable work in PostgreSQL), by plan and "
    "condition: all, resumed (taken over after a holder left) or stuck (no chunk moved for 60 s).",
    ["plan_id", "condition"],
)
FAN_OUT_LEFT = Gauge(
    "reminders_fanout_users_left",
    "Enrolled users of running fan-outs without a ledger row yet.",
    ["plan_id"],
)
REPLICAS_ALIVE = Gauge("reminders_replicas_alive", "Daemon replicas with a recent heartbeat.")
PLAN_FILE_PROBLEMS = Gauge(
    "reminders_plan_file_problems",
    "Plan files that do not validate (their plan's last good version keeps running).",
)

ENGAGEMENT = Gauge(
    "reminders_engagement",
    "Deliveries due in the window (24h, 7d) that WeChat accepted (sent), said it delivered,"
    " were opened, or had a cancellation attributed to them (docs/engagement.md).",
    ["plan", "window", "figure"],
)
ENGAGEMENT_RATE = Gauge(
    "reminders_engagement_rate",
    "opened / sent (click_through) and cancelled / sent (cancellation) of the deliveries due in"
    " the window; absent without sends.",
    ["plan", "window", "rate"],
)


def count(plan_id: str, outcome: str, reason: str | None, n: int = 1) -> None:
    if n:
        _sends(plan_id, str(outcome), str(reason or "")).inc(n)


@lru_cache(maxsize=1024)
def _sends(plan_id: str, outcome: str, reason: str) -> Any:
    """The counter child per label set, looked up once (`labels()` costs as much as a render)."""
    return SENDS.labels(plan_id, outcome, reason)


def observe_send(plan_id: str, occurrence: str, user_id: str, result: Any, seconds: float) -> None:
    """One send finished (`result` is a channel SendResult): count it, time it, log it."""
    outcome = result.outcome.value
    reason = result.reason.value if result.reason else None
    count(plan_id, outcome, reason)
    SEND_LATENCY.observe(seconds)
    if outcome == "sent" and not send_log.isEnabledFor(logging.DEBUG):
        return  # the common case: nothing to log, so build nothing
    fields = {
        "plan_id": plan_id,
        "user": user_id,
        "occurrence": occurrence,
        "outcome": outcome,
        "reason": reason,
        "errcode": result.errcode,
        "latency_ms": round(seconds * 1000, 1),
    }
    if outcome == "sent":
        send_log.debug("sent %s %s to %s", plan_id, occurrence, user_id, extra=fields)
    else:
        send_log.info(
            "%s %s %s to %s: %s (%s)",
            outcome,
            plan_id,
            occurrence,
            user_id,
            reason,
            result.detail,
            extra=fields,
        )


def count_errcode(errcode: int) -> None:
    """The channel's hook: WeChat answered this (non-zero) errcode."""
    WECHAT_ERRCODES.labels(str(errcode)).inc()


def observe_fire(kind: str, lag_seconds: float) -> None:
    FIRE_LAG.labels(kind).observe(max(lag_seconds, 0.0))


async def refresh_gauges(store: Any, *, window: timedelta | None = None) -> None:
    """Read the cluster-wide gauges from PostgreSQL (`store.metrics`, `store.fanout`,
    `store.engagement` with the attribution `window`, default the policy's default)."""
    gauges = await store.metrics.cluster_gauges()
    fan_outs = await store.fanout.progress()
    FAN_OUTS.clear()
    FAN_OUT_LEFT.clear()
    for f in fan_outs:
        for condition in ("all", "resumed", "stuck"):
            if condition == "all" or f[condition]:
                FAN_OUTS.labels(f["plan_id"], condition).inc()
        FAN_OUT_LEFT.labels(f["plan_id"]).inc(max(f["total"] - f["recorded"], 0))
    DUE_BACKLOG.clear()
    for kind, per_plan in (
        ("steps", gauges.due_steps),
        ("catch_up", gauges.catch_up),
        ("in_flight", gauges.in_flight),
    ):
        for plan_id, n in per_plan.items():
            DUE_BACKLOG.labels(plan_id, kind).set(n)
    PLANS.clear()
    for state in PlanState:
        PLANS.labels(state).set(0)
    for state, n in gauges.plans.items():
        PLANS.labels(state).set(n)
    REPLICAS_ALIVE.set(gauges.replicas_alive)
    PLAN_FILE_PROBLEMS.set(gauges.plan_file_problems)
    await refresh_engagement(
        store, now=datetime.now(UTC), window=window, max_age_s=ENGAGEMENT_REFRESH_S
    )


ENGAGEMENT_REFRESH_S = 60.0  # a week of a busy plan's ledger is not read at every scrape
_engagement_read_at: list[float] = []  # monotonic time of the last read (empty: never)


async def refresh_engagement(
    store: Any, *, now: datetime, window: timedelta | None, max_age_s: float = 0.0
) -> None:
    """The engagement gauges of every plan for the 24 hours and 7 days before `now`; kept as
    they are when they were read less than `max_age_s` ago."""
    from scheduler.app.engagement import DEFAULT_WINDOW, recent_figures

    if _engagement_read_at and time.monotonic() - _engagement_read_at[0] < max_age_s:
        return
    per_plan = await recent_figures(store, now=now, window=window or DEFAULT_WINDOW)
    _engagement_read_at[:] = [time.monotonic()]
    ENGAGEMENT.clear()
    ENGAGEMENT_RATE.clear()
    for plan_id, windows in per_plan.items():
        for span, f in windows.items():
            for figure in ("sent", "delivered", "opened", "cancelled"):
                ENGAGEMENT.labels(plan_id, span, figure).set(getattr(f, figure))
            for rate, value in (
                ("click_through", f.click_through),
                ("cancellation", f.cancellation_rate),
            ):
                if value is not None:
                    ENGAGEMENT_RATE.labels(plan_id, span, rate).set(value)


async def render(store: Any | None, *, window: timedelta | None = None) -> bytes:
    """The /metrics page: database gauges refreshed first (when the database answers);
    `window`: the policy's attribution window of cancellations."""
    if store is not None:
        try:
            await refresh_gauges(store, window=window)
        except Exception as exc:  # a scrape must answer even when the database does not
            logging.getLogger(__name__).warning("metrics: database gauges not refreshed: %s", exc)
    return generate_latest(REGISTRY)
