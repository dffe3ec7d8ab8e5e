"""The engagement report of a plan (docs/engagement.md): behind `reminders report`, the
engagement section of `reminders status PLAN`, `GET /v1/plans/{id}/engagement` and the gauges of
/metrics. The counts come from `store.engagement` (which decides attribution), the sums and rates
from `scheduler.domain.engagement`.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from scheduler.domain import engagement as figures
from scheduler.domain.engagement import Group, Grouping
from scheduler.domain.plan import Plan
from scheduler.domain.policy import DEFAULT_POLICY, Guard, Policy
from scheduler.errors import PlanError
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

DEFAULT_WINDOW = DEFAULT_POLICY.engagement.attribution_window.as_timedelta()


def policy_of(plans_dir: Path | None) -> Policy:
    """The plans folder's policy (`policy.yaml`): the default when there is no folder, and,
    with a warning, when its policy does not validate."""
    if plans_dir is None:
        return DEFAULT_POLICY
    from scheduler.planfiles import load_policy

    try:
        return load_policy(plans_dir)
    except PlanError as exc:
        log.warning("engagement: policy not readable, the default one used: %s", exc)
        return DEFAULT_POLICY


def attribution_window(plans_dir: Path | None) -> timedelta:
    """The policy's attribution window (the plans folder's `policy.yaml`); the default when
    there is no folder, and, with a warning, when its policy does not validate."""
    return policy_of(plans_dir).engagement.attribution_window.as_timedelta()


def plan_zone(plan: Plan) -> str:
    """Where a plan's days are counted: a calendar plan's time zone, else UTC (a relative plan's
    users each have their own)."""
    return plan.schedule.calendar.timezone if plan.schedule.calendar is not None else "UTC"


def _midnight(day: date, zone: str) -> datetime:
    return datetime.combine(day, time(), ZoneInfo(zone))


async def report(
    store: Store,
    plan_id: str,
    *,
    now: datetime,
    window: timedelta = DEFAULT_WINDOW,
    start: date | None = None,
    end: date | None = None,
    by: Grouping = "step",
    tz: str | None = None,
    guard: Guard | None = None,
    variants: bool = False,
) -> dict[str, Any] | None:
    """The plan's figures for the deliveries due from `start` to `end` (local dates in `tz`,
    both included; None: no bound, up to `now`), per `by`, with their total and the 24 h / 7 d /
    all-time windows before `now`. None when no such plan is loaded. `tz` must be a valid IANA
    zone (the callers check it); None: the plan's own (`plan_zone`). Grouped by step or
    variant, each row says whether its click-through is under the floor of `guard` (the
    plan's thresholds; None: the default policy's). Per variant, each row has the 95 % Wilson
    intervals of its rates; `variants`: the rows per variant as well (`variants`, with the same
    flag and intervals), when any delivery carried a variant."""
    row = await store.status.plan(plan_id)
    if row is None:
        return None
    zone = tz or plan_zone(Plan.model_validate(row["definition"]))
    rows = await store.engagement.rows(
        plan_id,
        now=now,
        window=window,
        start=_midnight(start, zone) if start is not None else None,
        end=_midnight(end + timedelta(days=1), zone) if end is not None else now,
        tz=zone,
    )
    groups = [Group.from_row(r) for r in rows]
    lines = figures.grouped(groups, by)
    floor = guard or DEFAULT_POLICY.guard_for(plan_id)
    if "step" in figures.KEYS[by]:
        lines = figures.flag_steps(lines, floor)
    extra: dict[str, Any] = {}
    if variants and any(g.variant != figures.DEFAULT_VARIANT for g in groups):
        per_variant = figures.flag_steps(figures.grouped(groups, "variant"), floor)
        extra["variants"] = [line.as_json() for line in per_variant]
    return {
        "plan_id": plan_id,
        "as_of": now.isoformat(),
        "from": start.isoformat() if start else None,
        "to": end.isoformat() if end else None,
        "tz": zone,
        "by": by,
        "attribution_window_hours": window / timedelta(hours=1),
        "click_through_floor": {
            "min_click_through": floor.min_click_through,
            "min_sends": floor.click_through_min_sends,
        },
        "rows": [line.as_json() for line in lines],
        "total": figures.total(g.figures for g in groups).as_json(),
        "windows": {k: f.as_json() for k, f in figures.windows(groups).items()},
        **extra,
    }


def render(report: dict[str, Any], fmt: figures.Format) -> str:
    """The report as a table (with its total), CSV (the rows) or JSON (everything)."""
    import json

    by: Grouping = report["by"]
    lines = [
        figures.Line(
            {k: r[k] for k in figures.KEYS[by]},
            figures.Figures.from_json(r),
            r.get(figures.FLAG),
        )
        for r in report["rows"]
    ]
    if fmt == "json":
        return json.dumps(report, ensure_ascii=False, indent=2)
    if fmt == "csv":
        return figures.to_csv(lines, by).rstrip("\n")
    overall = figures.Figures.from_json(report["total"])
    span = f"{report['from'] or 'the start'} to {report['to'] or 'now'}"
    head = (
        f"{report['plan_id']}: engagement by {by}, deliveries due {span} ({report['tz']}); "
        f"cancellations attributed within {report['attribution_window_hours']:g} h"
    )
    table = head + "\n" + figures.to_table(lines, by, overall)
    if any(line.low_click_through for line in lines):
        floor = report["click_through_floor"]
        under = figures.percent(floor["min_click_through"])
        table += (
            f"\n{figures.LOW_CTR}: click-through under {under} from {floor['min_sends']:,}"
            " sends (policy engagement.min_click_through)"
        )
    return table


async def plan_windows(
    store: Store,
    plan_id: str,
    *,
    now: datetime,
    window: timedelta = DEFAULT_WINDOW,
    guard: Guard | None = None,
) -> dict[str, Any]:
    """For `reminders status PLAN`: the 24 h / 7 d / all-time figures and the all-time figures
    per step (of each version), each step flagged when its click-through is under the floor,
    and per variant with their intervals (`variants`) when the plan's messages had variants."""
    found = await report(
        store, plan_id, now=now, window=window, by="step", guard=guard, variants=True
    )
    if found is None:
        return {}
    return {
        "windows": found["windows"],
        "steps": found["rows"],
        **({"variants": found["variants"]} if "variants" in found else {}),
        "attribution_window_hours": found["attribution_window_hours"],
        "click_through_floor": found["click_through_floor"],
    }


async def recent_figures(
    store: Store, *, now: datetime, window: timedelta = DEFAULT_WINDOW
) -> dict[str, dict[str, figures.Figures]]:
    """plan id -> {"24h": ..., "7d": ...} for the gauges of /metrics (deliveries due in the last
    7 days only, so a scrape stays cheap)."""
    out: dict[str, dict[str, figures.Figures]] = {}
    for plan_id in await store.engagement.plan_ids():
        rows = await store.engagement.rows(
            plan_id, now=now, window=window, start=now - timedelta(days=7), end=now
        )
        w = figures.windows(Group.from_row(r) for r in rows)
        out[plan_id] = {"24h": w["24h"], "7d": w["7d"]}
    return out
