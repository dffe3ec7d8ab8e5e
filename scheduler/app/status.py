"""What each plan is doing, from the database: the reports behind `reminders status` and the API.

Everything comes from PostgreSQL (plans, versions, the ledger, enrolments, replicas), so any
replica, the CLI or the API sees the same picture. Next fire times come from the plan's own
schedule maths (the triggers APScheduler fires), so they need no scheduler connection. Outcome
counts are by due time: "last 24 h" is what was due in the last 24 hours and how it ended.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from scheduler.app import engagement
from scheduler.app.engagement_guard import ACTOR as GUARD_ACTOR
from scheduler.app.engagement_guard import judge_plan
from scheduler.domain.consent import ConsentState
from scheduler.domain.engagement import (
    INTERVALS,
    LOW_CTR,
    interval_text,
    percent,
    thresholds_text,
)
from scheduler.domain.plan import Plan
from scheduler.domain.policy import DEFAULT_POLICY, Guard
from scheduler.domain.schedule import (
    calendar_anchor,
    calendar_occurrences,
    calendar_trigger,
    is_repeated_wall_time,
    schedule_warnings,
)
from scheduler.store.postgres import Store

log = logging.getLogger(__name__)

STATE_ACTIONS = ("pause", "resume", "cancel", "complete", "completed", "paused", "cancelled")


def _error(row: Any) -> dict[str, Any]:
    """A failed or unknown send, as status shows it."""
    return {
        "at": _iso(row["at"]),
        "user": row["user_id"],
        "occurrence": row["occurrence"],
        "status": row["status"],
        "reason": row["reason"],
        "errcode": row["errcode"],
        "detail": row["detail"],
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def next_fire_times(plan: Plan, registered_at: datetime, now: datetime, n: int) -> list[datetime]:
    """The next `n` fire times of a calendar plan after `now` (UTC)."""
    cal = plan.schedule.calendar
    assert cal is not None
    trigger = calendar_trigger(cal, calendar_anchor(cal, registered_at), now)
    times: list[datetime] = []
    while trigger is not None and len(times) < n and (t := trigger.next()) is not None:
        if cal.every is None and is_repeated_wall_time(t, cal.timezone):
            continue
        if t > now:
            times.append(t.astimezone(UTC))
    return times


def remaining_occurrences(plan: Plan, registered_at: datetime, now: datetime) -> int | None:
    """How many occurrences are still to come (None: no count and no end, it runs forever)."""
    cal = plan.schedule.calendar
    if cal is None or (cal.count is None and cal.end is None):
        return None
    anchor = calendar_anchor(cal, registered_at)
    if cal.count is not None:
        return sum(1 for o in calendar_occurrences(cal, anchor) if o.due_at > now)
    return len(next_fire_times(plan, registered_at, now, 10_000))


async def plan_status(
    store: Store,
    plan_id: str,
    *,
    now: datetime,
    next_n: int = 5,
    errors_n: int = 5,
    window: timedelta = engagement.DEFAULT_WINDOW,
    guard: Guard | None = None,
) -> dict[str, Any] | None:
    """One plan's full status, or None when no such plan is loaded (`window`: the policy's
    attribution window of cancellations; `guard`: the plan's engagement guard thresholds,
    None: the default policy's)."""
    reads = store.status
    row = await reads.plan(plan_id)
    if row is None:
        return None
    plan = Plan.model_validate(row["definition"])
    changed = await reads.last_state_change(plan_id, STATE_ACTIONS)
    report: dict[str, Any] = {
        "id": plan_id,
        "name": plan.name,
        "kind": row["kind"],
        "category": plan.category.value,
        "consent": plan.consent.value,
        "grace": str(plan.schedule.grace),
        "state": row["state"],
        "state_reason": row["state_reason"],
        "state_changed": {
            "at": _iso(changed["recorded_at"]),
            "by": changed["actor"],
            "action": changed["action"],
        }
        if changed
        else None,
        "paused_at": _iso(row["paused_at"]),
        "version": row["current_version"],
        "versions": row["versions"],
        "source_file": row["source_file"],
        "loaded_at": _iso(row["loaded_at"]),
        "as_of": now.isoformat(),
    }
    ended = row["state"] in ("cancelled", "completed")
    if plan.schedule.calendar is not None:
        cal = plan.schedule.calendar
        tz = ZoneInfo(cal.timezone)
        times = [] if ended else next_fire_times(plan, row["registered_at"], now, next_n)
        report["timezone"] = cal.timezone
        report["next_fires"] = [
            {"utc": t.isoformat(), "local": t.astimezone(tz).isoformat()} for t in times
        ]
        report["remaining"] = 0 if ended else remaining_occurrences(plan, row["registered_at"], now)
        # Years its official calendar does not know yet, months without its monthly day.
        report["warnings"] = (
            [] if ended else schedule_warnings(cal, calendar_anchor(cal, row["registered_at"]))
        )
    else:
        due = await reads.upcoming_steps(plan_id, now, next_n)
        report["next_fires"] = [
            {"utc": r["next_due_at"].isoformat(), "users": r["users"]} for r in due
        ]
        report["overdue_steps"] = await reads.overdue_steps(plan_id, now)
    report["held"] = row["state"] == "paused"
    report["catch_up_queued"] = await reads.catch_up_queued(plan_id)
    report["enrollments"] = await reads.enrolments_by_status(plan_id)
    report["outcomes"] = await outcome_counts(store, plan_id, now)
    report["last_errors"] = [
        {**_error(r), "version": r["plan_version"]}
        for r in await reads.last_errors(plan_id, errors_n)
    ]
    report["file_problems"] = await _problems(store, plan_id, row["source_file"])
    report["runway"] = await _runway(store, plan_id, now)
    guard = guard or DEFAULT_POLICY.guard_for(plan_id)
    report["engagement"] = await _engagement(store, plan_id, now, window, guard)
    report["guard"] = await _guard(store, plan_id, now, window, guard, row["state"], changed)
    return report


async def outcome_counts(store: Store, plan_id: str | None, now: datetime) -> list[dict[str, Any]]:
    """Rows of {outcome, reason, 24h, 7d, all}, by due time, for one plan or all of them."""
    rows = await store.status.outcome_counts(plan_id, now)
    return [
        {
            "outcome": r["status"],
            "reason": r["reason"],
            "24h": r["d1"],
            "7d": r["d7"],
            "all": r["total"],
        }
        for r in rows
    ]


async def _problems(store: Store, plan_id: str, source: str | None) -> list[dict[str, Any]]:
    rows = await store.status.file_problems_of(plan_id, source)
    return [
        {
            "file": r["source_file"],
            "problems": r["problems"],
            "since": _iso(r["first_seen"]),
            "last_seen": _iso(r["last_seen"]),
        }
        for r in rows
    ]


async def _runway(store: Store, plan_id: str, now: datetime) -> dict[str, Any] | None:
    """The consent runway (`ConsentStore.runway`), or the reason it could not be read."""
    try:
        report = await store.consent.runway(plan_id, now=now, limit=5)
    except Exception as exc:  # status must show the rest even if this part fails
        log.warning("consent runway of %s not available: %s", plan_id, exc)
        return {"error": str(exc)}
    return report.as_json() if report is not None else None


async def _engagement(
    store: Store, plan_id: str, now: datetime, window: timedelta, guard: Guard
) -> dict[str, Any]:
    """The engagement figures (`scheduler.app.engagement`), or the reason they could not be read."""
    try:
        return await engagement.plan_windows(store, plan_id, now=now, window=window, guard=guard)
    except Exception as exc:  # status must show the rest even if this part fails
        log.warning("engagement figures of %s not available: %s", plan_id, exc)
        return {"error": str(exc)}


async def _guard(
    store: Store,
    plan_id: str,
    now: datetime,
    window: timedelta,
    guard: Guard,
    state: str,
    changed: Any,
) -> dict[str, Any]:
    """The engagement guard's view of the plan: its thresholds, its verdict on the recent
    deliveries now, and the automatic pause in force (if the plan is paused by it)."""
    section: dict[str, Any] = {
        "thresholds": guard.model_dump(mode="json"),
        "rule": thresholds_text(guard),
        "paused": None,
    }
    if state == "paused" and changed is not None and changed["actor"] == GUARD_ACTOR:
        section["paused"] = {"at": _iso(changed["recorded_at"]), "by": GUARD_ACTOR}
    try:
        judged = await judge_plan(store, plan_id, guard, now=now, window=window)
    except Exception as exc:  # status must show the rest even if this part fails
        log.warning("engagement guard verdict of %s not available: %s", plan_id, exc)
        return {**section, "error": str(exc)}
    verdict = judged.verdict
    section["verdict"] = {
        "pause": verdict.pause,
        "rule": verdict.rule,
        "figures": verdict.figures,
        "note": verdict.note,
        "recent": judged.observed.recent.as_json(),
        "baseline": judged.observed.baseline.as_json(),
    }
    return section


async def replicas(store: Store) -> list[dict[str, Any]]:
    """Replicas seen in the last day, alive (heartbeat within 30 s) or not."""
    rows = await store.status.replicas()
    return [
        {
            "id": r["id"],
            "host": r["host"],
            "pid": r["pid"],
            "alive": r["alive"],
            "started_at": _iso(r["started_at"]),
            "last_seen": _iso(r["last_seen"]),
        }
        for r in rows
    ]


OVERVIEW_ERRORS = 5  # the newest failed or unknown sends the overview lists


async def overview(store: Store, *, now: datetime) -> dict[str, Any]:
    """Every plan in one line each, the unattached file problems, and the replicas."""
    reads = store.status
    plans = await reads.plans()
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for r in await reads.outcome_counts_per_plan(now):
        per = counts.setdefault(r["plan_id"], {})
        per[r["status"]] = {"24h": r["d1"], "7d": r["d7"], "all": r["total"]}
    enrolled = await reads.active_enrolments_per_plan()
    consent_rows = await reads.consent_of_active_enrolments()
    problem_rows = await reads.file_problems()
    lines = []
    for p in plans:
        plan = Plan.model_validate(p["definition"])
        # Runway at a glance: enrolments whose consent would not cover the plan's next send.
        uncovered = sum(
            r["n"]
            for r in consent_rows
            if r["plan_id"] == p["id"]
            and not ConsentState(r["credits"], r["long_term"], r["banned"]).allows(plan.consent)
        )
        paused_by = None
        if p["state"] == "paused":  # who paused it: an admin, damage control, the guard
            last = await reads.last_state_change(p["id"], STATE_ACTIONS)
            paused_by = last["actor"] if last else None
        nxt: str | None = None
        if p["state"] in ("active", "paused"):
            if plan.schedule.calendar is not None:
                times = next_fire_times(plan, p["registered_at"], now, 1)
                nxt = times[0].isoformat() if times else None
            else:
                nxt = _iso(await reads.first_due_step(p["id"]))
        lines.append(
            {
                "id": p["id"],
                "name": plan.name,
                "state": p["state"],
                "state_reason": p["state_reason"],
                "paused_by": paused_by,
                "version": p["current_version"],
                "kind": "relative" if plan.is_relative else "calendar",
                "next_fire": nxt,
                "enrolled": enrolled.get(p["id"], 0),
                "no_consent_next": uncovered,
                "outcomes": counts.get(p["id"], {}),
                "file_problem": any(r["plan_id"] == p["id"] for r in problem_rows),
            }
        )
    return {
        "as_of": now.isoformat(),
        "plans": lines,
        "file_problems": [
            {
                "file": r["source_file"],
                "plan_id": r["plan_id"],
                "problems": r["problems"],
                "since": _iso(r["first_seen"]),
            }
            for r in problem_rows
        ],
        "last_errors": [
            {"plan_id": r["plan_id"], **_error(r)}
            for r in await reads.last_errors_anywhere(OVERVIEW_ERRORS)
        ],
        "replicas": await replicas(store),
        "fan_outs": await store.fanout.progress(),
    }


# --- text ---------------------------------------------------------------------------------------


def _when(iso: str | None, tz: str | None = None, *, seconds: bool = False) -> str:
    """A moment in UTC, or in the plan's zone with its UTC offset (zone abbreviations such as
    CST are ambiguous: China, or US Central?)."""
    if not iso:
        return "-"
    moment = datetime.fromisoformat(iso)
    shape = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M"
    if tz:
        local = moment.astimezone(ZoneInfo(tz))
        offset = local.isoformat()[-6:]  # +08:00
        return f"{local.strftime(shape)} UTC{offset} ({tz})"
    return moment.astimezone(UTC).strftime(f"{shape} UTC")


def _within_a_minute(moments: list[str]) -> bool:
    """Whether two of these (ISO) moments share a minute: then show seconds too."""
    parsed = sorted(datetime.fromisoformat(m) for m in moments)
    return any(b - a < timedelta(minutes=1) for a, b in zip(parsed, parsed[1:], strict=False))


def render_overview(report: dict[str, Any]) -> str:
    out = [f"reminders status as of {_when(report['as_of'])}", ""]
    head = (
        f"{'PLAN':<18} {'STATE':<10} {'VER':>3} {'ENROLLED':>8} {'DRY':>5}  {'NEXT':<21}"
        f" {'SENT 24h/7d/all':>16} {'FAILED':>6} {'SKIPPED':>7} {'MISSED':>6}"
    )
    out.append(head)
    for p in report["plans"]:
        o = p["outcomes"]
        sent = o.get("sent", {})
        state = p["state"] + ("!" if p["file_problem"] else "")
        out.append(
            f"{p['id']:<18} {state:<10} {p['version']:>3} {p['enrolled']:>8}"
            f" {p['no_consent_next']:>5}  "
            f"{_when(p['next_fire']):<21}"
            f" {'/'.join(str(sent.get(k, 0)) for k in ('24h', '7d', 'all')):>16}"
            f" {o.get('failed', {}).get('all', 0):>6} {o.get('skipped', {}).get('all', 0):>7}"
            f" {o.get('missed', {}).get('all', 0):>6}"
        )
        if p.get("paused_by") == GUARD_ACTOR:
            out.append(f"{'':<18} PAUSED BY THE ENGAGEMENT GUARD: reminders resume {p['id']}")
        if p["state"] != "active" and p["state_reason"]:
            out.append(f"{'':<18} ({p['state_reason']})")
    if not report["plans"]:
        out.append("(no plans loaded)")
    elif any(p["no_consent_next"] for p in report["plans"]):
        out.append("DRY: enrolments whose consent does not cover the next send (see status PLAN)")
    if report["last_errors"]:
        out += ["", "Last errors:"]
        for e in report["last_errors"]:
            why = e["reason"] + (f" {e['errcode']}" if e["errcode"] else "")
            out.append(
                f"  {_when(e['at'])} {e['plan_id']} {e['user']}: {e['status']} ({why})"
                + (f" {e['detail']}" if e["detail"] else "")
            )
    if report["file_problems"]:
        out += ["", "Plan files rejected (the last good version keeps running):"]
        for f in report["file_problems"]:
            for pr in f["problems"]:
                field = f"{pr['field']}: " if pr["field"] else ""
                out.append(f"  {f['file']}: {field}{pr['reason']}")
    out += ["", *render_fan_outs(report["fan_outs"])]
    out += ["", *render_replicas(report["replicas"])]
    return "\n".join(out)


def render_fan_outs(rows: list[dict[str, Any]]) -> list[str]:
    """Occurrences under way: progress, holders, rate, and whether they were resumed after a
    replica left them or look stuck."""
    if not rows:
        return ["Fan-outs under way: none"]
    out = [f"Fan-outs under way: {len(rows)}"]
    for f in rows:
        flags = [w for w in ("resumed", "stuck") if f[w]]
        holders = ", ".join(f["holders"]) or "nobody (waiting for a replica)"
        out.append(
            f"  {f['plan_id']} step {f['step']} ({_when(f['occurrence'])}): "
            f"{f['recorded']}/{f['total']} recorded, {f['sent']} sent, "
            f"{f['chunks_left']}/{f['chunks']} chunks left, {f['rate_per_s']}/s since "
            f"{_when(f['started_at'])}; held by {holders}"
            + (f"  [{', '.join(flags)}]" if flags else "")
        )
    return out


def render_replicas(rows: list[dict[str, Any]]) -> list[str]:
    alive = [r for r in rows if r["alive"]]
    out = [f"Replicas: {len(alive)} alive"]
    for r in rows:
        seen = _when(r["last_seen"]) if r["last_seen"] else "stopped cleanly"
        state = "alive" if r["alive"] else "gone "
        out.append(f"  {state} {r['id']:<16} {r['host']} pid {r['pid']}  last seen {seen}")
    return out


def render_engagement(section: dict[str, Any]) -> list[str]:
    """The engagement lines of `reminders status PLAN`: windows, then all time per step, then
    per variant with the 95 % intervals of its rates (when the plan's messages had variants)."""
    if "error" in section:
        return [f"  engagement  unavailable: {section['error']}"]
    if not section:
        return []
    hours = section["attribution_window_hours"]
    variants = section.get("variants", [])
    labels = [_variant_label(v) for v in variants]
    width = max([15, *(len(label) for label in labels)])  # variant names run to 32
    out = [
        f"  engagement  {'(by due time)':<{width}} {'sent':>6} {'deliv.':>6} {'opened':>6} "
        f"{'CTR':>6} {'cancel':>6} {'canc.%':>6}   (docs/engagement.md; window {hours:g} h)"
    ]

    def line(label: str, f: dict[str, Any]) -> str:
        return (
            f"              {label:<{width}} {f['sent']:>6} {f['delivered']:>6} {f['opened']:>6} "
            f"{percent(f['click_through']):>6} {f['cancelled']:>6} "
            f"{percent(f['cancellation_rate']):>6}"
        )

    for name, label in (("24h", "last 24 h"), ("7d", "last 7 days"), ("all", "all time")):
        out.append(line(label, section["windows"][name]))
    floor = section.get("click_through_floor")
    for s in section["steps"]:
        flag = ""
        if s.get("low_click_through") and floor:
            flag = (
                f"   {LOW_CTR}: under {percent(floor['min_click_through'])}"
                f" from {floor['min_sends']:,} sends"
            )
        out.append(line(f"v{s['version']} step {s['step']}", s) + flag)
    for label, v in zip(labels, variants, strict=True):
        # Each variant's rates with their 95 % intervals: which wording keeps users subscribed.
        ctr, canc = (interval_text(_pair(v[k])) for k in INTERVALS)
        flag = f"   {LOW_CTR}" if v.get("low_click_through") else ""
        out.append(line(label, v) + f"   95% CI: CTR {ctr}, canc. {canc}{flag}")
    return out


def _variant_label(v: dict[str, Any]) -> str:
    return f"v{v['version']} step {v['step']} {v['variant']}"


def _pair(interval: list[float] | None) -> tuple[float, float] | None:
    return None if interval is None else (interval[0], interval[1])


def render_guard(section: dict[str, Any], plan_id: str) -> list[str]:
    """The engagement guard's lines of `reminders status PLAN`: an automatic pause in force
    and what to do, its verdict on the recent deliveries, its thresholds."""
    if not section:
        return []
    out = []
    if section.get("paused"):
        out.append(
            f"  guard       PAUSED this plan at {_when(section['paused']['at'])}: fix the "
            f"content, then `reminders resume {plan_id}` (docs/engagement.md)"
        )
    if "error" in section:
        out.append(f"  guard       verdict unavailable: {section['error']}")
    else:
        v = section["verdict"]
        said = "would pause" if v["pause"] else "ok"
        if section.get("paused"):
            said = "since then"  # what the pause judged is left out: what a resume starts from
        if v["pause"]:
            said += f" ({v['rule']})"
        note = f" ({v['note']})" if v["note"] else ""
        out.append(f"  guard       {said}: {v['figures']}{note}")
    out.append(f"              {section['rule']}")
    return out


def render_plan(report: dict[str, Any], replica_rows: list[dict[str, Any]] | None = None) -> str:
    tz = report.get("timezone")
    out = [f"{report['id']}: {report['name']}"]
    state = report["state"]
    if report["state_reason"]:
        state += f" - {report['state_reason']}"
    changed = report["state_changed"]
    if changed:
        state += f" (since {_when(changed['at'])}, by {changed['by']})"
    out.append(f"  state       {state}")
    for warning in report.get("warnings", []):
        out.append(f"  warning     {warning}")
    out.append(
        f"  version     {report['version']} of {report['versions']}, loaded "
        f"{_when(report['loaded_at'])} from {report['source_file']}"
    )
    out.append(
        f"  plan        {report['kind']}, {report['category']}, {report['consent']} consent, "
        f"grace {report['grace']}"
    )
    held = " (held while paused)" if report["held"] else ""
    if report["kind"] == "calendar":
        remaining = report.get("remaining")
        left = "runs until cancelled" if remaining is None else f"{remaining} occurrence(s) left"
        out.append(f"  next fires{held}  {left}")
        seconds = _within_a_minute([t["utc"] for t in report["next_fires"]])
        for t in report["next_fires"]:
            out.append(f"              {_when(t['utc'], tz, seconds=seconds)}")
    else:
        out.append(f"  next steps{held}  overdue now: {report['overdue_steps']}")
        for t in report["next_fires"]:
            out.append(f"              {_when(t['utc'])}  {t['users']} user(s)")
    if not report["next_fires"]:
        out.append("              (none)")
    if report["catch_up_queued"]:
        out.append(f"  catch-up    {report['catch_up_queued']} occurrence(s) queued")
    enrol = ", ".join(f"{k} {v}" for k, v in sorted(report["enrollments"].items())) or "none"
    out.append(f"  enrolments  {enrol}")
    out.append(f"  outcomes    {'(by due time)':<28} {'24h':>6} {'7d':>6} {'all':>7}")
    for o in report["outcomes"]:
        label = o["outcome"] + (f" ({o['reason']})" if o["reason"] else "")
        out.append(f"              {label:<28} {o['24h']:>6} {o['7d']:>6} {o['all']:>7}")
    if not report["outcomes"]:
        out.append("              (nothing due yet)")
    runway = report.get("runway")
    if runway and "error" not in runway and not runway["enrolled"]:
        out.append("  runway      no active enrolment: nothing left to cover")
    elif runway and "error" not in runway:
        out.append(
            f"  runway      {runway['enrolled']} enrolled: {runway['covered_to_end']} covered to "
            f"the end, {runway['runs_dry_total']} run dry, "
            f"{runway['dry_next']} dry at the next step"
        )
        for u in runway["runs_dry"][:5]:
            out.append(
                f"              {u['openid']}: {u['steps_covered']} step(s) covered, dry at step "
                f"{u['dry_step']} ({_when(u['dry_at'])})"
            )
    elif runway:
        out.append(f"  runway      unavailable: {runway['error']}")
    out += render_engagement(report.get("engagement") or {})
    out += render_guard(report.get("guard") or {}, report["id"])
    if report["last_errors"]:
        out.append("  last errors")
        for e in report["last_errors"]:
            code = f" errcode {e['errcode']}" if e["errcode"] is not None else ""
            out.append(
                f"              {_when(e['at'])} {e['user']} {e['occurrence']}: {e['status']} "
                f"{e['reason']}{code} {e['detail'] or ''}".rstrip()
            )
    for f in report["file_problems"]:
        out.append(f"  FILE ERROR  {f['file']} (since {_when(f['since'])}; last good version runs)")
        for pr in f["problems"]:
            out.append(f"              {pr['field'] + ': ' if pr['field'] else ''}{pr['reason']}")
    if replica_rows is not None:
        out += ["", *render_replicas(replica_rows)]
    return "\n".join(out)
