"""The rules before every send (DESIGN.md, "The pipeline of one send", steps 4-7). Pure: no I/O,
and the clock is always a parameter.

In the gate's order:

4. `category_rule(plan, policy)`: the template kind is allowed for the plan's category.
5. `content_rules(plan, rendered, policy)` and `field_rules(plan, rendered)`: the rendered message
   has no promotional word, carries its category's disclaimer, makes no forbidden claim, and every
   template field value is one WeChat accepts (wechat-api.md §4).
6. `quiet_hours(local, window)`: None, or the next local moment the window allows.
7. `cap_counters(...)`: the counters one send increments, each with its limit; the gate checks and
   counts them atomically in PostgreSQL, and `on_capped` says what to do when one is full.

`check_send` runs steps 4-6 and returns the counters of step 7. `static_violations` is what
`reminders validate` can check without a user: the category, the plan's own caps, its schedule
against the caps and quiet hours, and its fixed message text. `dry_run` is `preview`'s simulation.
"""

from __future__ import annotations

import functools
import heapq
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from itertools import islice
from zoneinfo import ZoneInfo

from scheduler.domain.messages import RenderError, render, variant_for
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import ConsentKind, Plan, placeholders
from scheduler.domain.policy import FrequencyLimit, Policy, QuietWindow
from scheduler.domain.schedule import (
    Occurrence,
    calendar_anchor,
    calendar_occurrences,
    relative_occurrences,
    require_aware,
)
from scheduler.domain.template_fields import check_value


@dataclass(frozen=True)
class Violation:
    """Why a rule stops a message: the ledger's reason, the rule's name and a readable detail."""

    reason: Reason
    rule: str
    detail: str
    field: str | None = None  # the message field at fault, or the plan field (static checks)

    def __str__(self) -> str:
        return f"{self.reason.value} ({self.rule}): {self.detail}"


# --- effective limits ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The caps and quiet hours that apply to one plan's messages."""

    user_day: int
    category_week: int
    plan_day: int | None
    plan_week: int | None
    quiet: QuietWindow
    limited: FrequencyLimit | None  # the category's frequency-limited long-term kind


_CAP_NAMES = ("user_day", "category_week", "plan_day", "plan_week")


def _policy_caps(plan: Plan, policy: Policy) -> dict[str, int | None]:
    """The policy's caps for this plan, with its exception (if any) applied."""
    caps: dict[str, int | None] = {
        "user_day": policy.caps.user_day,
        "category_week": policy.caps.category_week_for(plan.category),
        "plan_day": policy.caps.plan_day,
        "plan_week": policy.caps.plan_week,
    }
    exception = policy.exceptions.get(plan.id)
    if exception is not None:
        caps.update({n: getattr(exception, n) for n in _CAP_NAMES if getattr(exception, n)})
    return caps


def _stricter(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def plan_limits(plan: Plan, policy: Policy) -> Limits:
    """The policy's limits (or the plan's exception), made stricter by the plan's own caps.

    A plan cap looser than the policy's is ignored here (and reported by `looser_caps`)."""
    caps = _policy_caps(plan, policy)
    own = plan.delivery.caps
    merged = {n: _stricter(caps[n], getattr(own, n)) for n in _CAP_NAMES}
    exception = policy.exceptions.get(plan.id)
    quiet = policy.quiet_hours.window_for(plan.category)
    if exception is not None and exception.quiet_hours is not None:
        quiet = exception.quiet_hours
    limited = (
        policy.limited_long_term.get(plan.category)
        if plan.consent == ConsentKind.LONG_TERM
        else None
    )
    return Limits(
        user_day=merged["user_day"] or policy.caps.user_day,
        category_week=merged["category_week"] or policy.caps.category_week_default,
        plan_day=merged["plan_day"],
        plan_week=merged["plan_week"],
        quiet=quiet,
        limited=limited,
    )


def looser_caps(plan: Plan, policy: Policy) -> list[Violation]:
    """The plan's own caps that are looser than the policy allows it (static)."""
    caps = _policy_caps(plan, policy)
    found = []
    for name in _CAP_NAMES:
        own, allowed = getattr(plan.delivery.caps, name), caps[name]
        if own is not None and allowed is not None and own > allowed:
            found.append(
                Violation(
                    Reason.CAPPED,
                    "looser_cap",
                    f"{own} is looser than the policy's {allowed}: a plan may only be stricter "
                    "(ask for an exception in policy.yaml)",
                    field=f"delivery.caps.{name}",
                )
            )
    return found


# --- 4. category --------------------------------------------------------------------------------


def category_rule(plan: Plan, policy: Policy) -> Violation | None:
    """None if the plan's template kind is allowed for its category."""
    if plan.consent != ConsentKind.LONG_TERM:
        return None
    category = plan.category.value
    if plan.category not in policy.long_term_categories:
        allowed = ", ".join(c.value for c in policy.long_term_categories)
        return Violation(
            Reason.CATEGORY,
            "long_term_category",
            f"{category} may not use long-term templates (allowed: {allowed}); "
            "use one_time consent",
            field="consent",
        )
    limited = policy.limited_long_term.get(plan.category)
    if limited is not None and plan.delivery.limit_key is None:
        return Violation(
            Reason.CATEGORY,
            "limited_long_term",
            f"long-term {category} templates are limited to {limited} per key value: "
            "name the key (e.g. the policy number variable) in delivery.limit_key",
            field="delivery.limit_key",
        )
    return None


# --- 5. content and fields ----------------------------------------------------------------------


def _normal(text: str) -> str:
    # Full-width letters and case must not hide a word: "ＳＡＬＥ" is "sale".
    return unicodedata.normalize("NFKC", text).casefold()


def _phrase_pattern(phrase: str) -> str:
    words = _normal(phrase)
    if words.isascii():
        # Latin words match whole (and plural): "sale" is in "sales", not in "wholesale".
        return rf"(?<![a-z0-9]){re.escape(words)}(?:s|es)?(?![a-z0-9])"
    return re.escape(words)


@functools.lru_cache(maxsize=256)
def _matcher(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One pattern for a whole phrase list (a message is checked against every phrase): group
    `p<i>` is phrase i."""
    if not phrases:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?P<p{i}>{_phrase_pattern(p)})" for i, p in enumerate(phrases)))


def _first_phrase(text: str, phrases: Sequence[str]) -> str | None:
    """The first phrase (by position in the text) that `text` contains, or None."""
    phrases = tuple(phrases)
    match = _matcher(phrases).search(_normal(text))
    if match is None or match.lastgroup is None:
        return None
    return phrases[int(match.lastgroup[1:])]


def content_violations(plan: Plan, rendered: Mapping[str, str], policy: Policy) -> list[Violation]:
    """Every content rule the rendered message breaks (empty: it passes), fields in order."""
    rules = policy.content
    category = plan.category.value
    found = []
    if rules.promotional_scope == "all" or plan.consent == ConsentKind.LONG_TERM:
        for key, text in rendered.items():
            word = _first_phrase(text, rules.all_promotional_words)
            if word is not None:
                found.append(
                    Violation(
                        Reason.CONTENT,
                        "promotional",
                        f"{key} contains the promotional word {word!r}: no promotions in a "
                        "long-term reminder",
                        field=key,
                    )
                )
    disclaimers = rules.disclaimers.get(plan.category)
    if disclaimers and not any(_first_phrase(t, disclaimers) for t in rendered.values()):
        phrases = ", ".join(repr(p) for p in disclaimers)
        found.append(
            Violation(
                Reason.CONTENT,
                "disclaimer",
                f"{category} message lacks the disclaimer: none of {phrases} appears in any field",
            )
        )
    for key, text in rendered.items():
        claim = _first_phrase(text, rules.forbidden_claims.get(plan.category, ()))
        if claim is not None:
            found.append(
                Violation(
                    Reason.CONTENT,
                    "forbidden_claim",
                    f"{key} contains {claim!r}, which {category} messages must not say",
                    field=key,
                )
            )
    return found


def content_rules(plan: Plan, rendered: Mapping[str, str], policy: Policy) -> Violation | None:
    """The first content rule the rendered message breaks, or None."""
    return next(iter(content_violations(plan, rendered, policy)), None)


def field_violations(plan: Plan, rendered: Mapping[str, str]) -> list[Violation]:
    """Every template field whose value WeChat would refuse with 47003 (`check_value`)."""
    found = []
    for key, type_ in plan.template.fields.items():
        problem = check_value(type_, rendered.get(key, ""))
        if problem is not None:
            found.append(Violation(Reason.FIELD, "field", f"{key}: {problem}", field=key))
    return found


def field_rules(plan: Plan, rendered: Mapping[str, str]) -> Violation | None:
    """The first template field value WeChat would refuse, or None."""
    return next(iter(field_violations(plan, rendered)), None)


# --- 6. quiet hours -----------------------------------------------------------------------------


def local_moment(day: date, at: time, tz: ZoneInfo) -> datetime:
    """`day` at wall time `at` in `tz`: a time skipped by a DST change moves past the gap, and a
    repeated time is its first instance."""
    naive = datetime.combine(day, at.replace(tzinfo=None, fold=0))
    return naive.replace(tzinfo=tz).astimezone(UTC).astimezone(tz)


def _in_window(wall: time, window: QuietWindow) -> bool:
    start, end = window.start, window.end
    if start == end:
        return False
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end  # spans midnight


def quiet_hours(local: datetime, window: QuietWindow) -> datetime | None:
    """None if `local` (aware, in the user's zone) is outside the quiet window, else the next
    moment the window allows, in the same zone: the window's end on the user's local calendar."""
    require_aware(local, "local time")
    tz = local.tzinfo
    assert isinstance(tz, ZoneInfo), "quiet hours need the user's ZoneInfo"
    wall = local.time().replace(tzinfo=None, fold=0)
    if not _in_window(wall, window):
        return None
    day = local.date() + timedelta(days=1 if wall >= window.end else 0)
    opening = local_moment(day, window.end, tz)
    # Compared in UTC: Python compares two times of one zone by wall clock, ignoring `fold`.
    if opening.astimezone(UTC) <= local.astimezone(UTC):
        # Inside the repeated hour of a fall-back night: the end's second instance is next.
        opening = datetime.combine(day, window.end, tzinfo=tz).replace(fold=1)
    return opening


# --- 7. frequency caps --------------------------------------------------------------------------


# Stands for the user in the keys of counters worked out once for many users (an openid never
# holds it): `CapCounter.for_user` puts the user in.
USER_SLOT = "\x00"


@dataclass(frozen=True)
class CapCounter:
    """One counter a send increments. The gate allows the send only if every counter of it is
    below its limit, and counts them all in the same transaction."""

    key: str  # unique per counter and window, e.g. "user-day:oABC:2026-03-08"
    limit: int
    what: str  # e.g. "per user per local day, all plans"
    window: str  # e.g. "2026-03-08", "2026-W10", "2026-03"
    resets_at: datetime  # aware: when the window ends (a deferred message may go then)

    def detail(self) -> str:
        return f"at most {self.limit} {self.what} ({self.window}) reached"

    def key_for(self, user: str) -> str:
        """This counter's key for `user`, when it was worked out for `USER_SLOT`."""
        return self.key.replace(USER_SLOT, user)


# A fan-out computes the same windows for every user of a zone: each is worked out once.
def _day_window(local: datetime) -> tuple[str, datetime]:
    return _day_window_of(local.date(), _zone(local))


def _week_window(local: datetime) -> tuple[str, datetime]:
    return _week_window_of(local.date(), _zone(local))


def _month_window(local: datetime) -> tuple[str, datetime]:
    first = date(local.year + local.month // 12, local.month % 12 + 1, 1)
    return f"{local.year}-{local.month:02d}", local_moment(first, time(), _zone(local))


def _year_window(local: datetime) -> tuple[str, datetime]:
    return str(local.year), local_moment(date(local.year + 1, 1, 1), time(), _zone(local))


@functools.lru_cache(maxsize=4096)
def _day_window_of(day: date, tz: ZoneInfo) -> tuple[str, datetime]:
    return day.isoformat(), local_moment(day + timedelta(days=1), time(), tz)


@functools.lru_cache(maxsize=4096)
def _week_window_of(day: date, tz: ZoneInfo) -> tuple[str, datetime]:
    year, week, weekday = day.isocalendar()
    monday = day + timedelta(days=8 - weekday)
    return f"{year}-W{week:02d}", local_moment(monday, time(), tz)


_WINDOWS = {"day": _day_window, "week": _week_window, "month": _month_window, "year": _year_window}


def _zone(local: datetime) -> ZoneInfo:
    assert isinstance(local.tzinfo, ZoneInfo), "cap windows need the user's ZoneInfo"
    return local.tzinfo


def limit_key_value(
    plan: Plan, variables: Mapping[str, object], rendered: Mapping[str, str]
) -> str | None:
    """The value of the plan's `delivery.limit_key` for one user: a variable or a field."""
    key = plan.delivery.limit_key
    if key is None:
        return None
    value = variables.get(key, rendered.get(key))
    return None if value is None else str(value)


def cap_counters(
    plan: Plan,
    policy: Policy,
    user: str,
    at: datetime,
    tz: ZoneInfo,
    key_value: str | None = None,
    limits: Limits | None = None,
) -> tuple[CapCounter, ...]:
    """The counters one send of `plan` to `user` at `at` increments, windows in the user's
    local calendar (`tz`): the day, the ISO week (Monday to Sunday), the month."""
    local = require_aware(at, "send time").astimezone(tz)
    limits = limits or plan_limits(plan, policy)
    day, day_end = _day_window(local)
    week, week_end = _week_window(local)
    category = plan.category.value
    counters = [
        CapCounter(f"user-day:{user}:{day}", limits.user_day, "per user per day", day, day_end),
        CapCounter(
            f"user-category-week:{user}:{category}:{week}",
            limits.category_week,
            f"{category} messages per user per week",
            week,
            week_end,
        ),
    ]
    if limits.plan_day is not None:
        counters.append(
            CapCounter(
                f"plan-day:{plan.id}:{user}:{day}",
                limits.plan_day,
                f"{plan.id} messages per user per day",
                day,
                day_end,
            )
        )
    if limits.plan_week is not None:
        counters.append(
            CapCounter(
                f"plan-week:{plan.id}:{user}:{week}",
                limits.plan_week,
                f"{plan.id} messages per user per week",
                week,
                week_end,
            )
        )
    if limits.limited is not None:
        period, period_end = _WINDOWS[limits.limited.per](local)
        value = key_value if key_value is not None else ""
        counters.append(
            CapCounter(
                f"limit-key:{category}:{user}:{value}:{period}",
                limits.limited.sends,
                f"{category} messages per {plan.delivery.limit_key or 'user'} {value!r} "
                f"per {limits.limited.per}",
                period,
                period_end,
            )
        )
    return tuple(counters)


# --- the gate's decision ------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the rules say about one send now: go (count `counters`, then send), defer until
    `defer_until`, or skip. A stopped message carries the violation that stopped it."""

    violation: Violation | None = None
    defer_until: datetime | None = None
    counters: tuple[CapCounter, ...] = ()

    @property
    def go(self) -> bool:
        return self.violation is None

    @property
    def outcome(self) -> Outcome | None:
        """None to go on, else the ledger outcome: deferred or skipped."""
        if self.violation is None:
            return None
        return Outcome.DEFERRED if self.defer_until is not None else Outcome.SKIPPED


def defer_or_skip(
    plan: Plan, violation: Violation, defer: bool, until: datetime, due_at: datetime
) -> Decision:
    """The one place that decides between deferring a stopped send to `until` (when `defer`
    and that is within the plan's max_delay of `due_at`) and skipping it."""
    max_delay = plan.delivery.max_delay.as_timedelta()
    if defer and until.astimezone(UTC) - due_at.astimezone(UTC) <= max_delay:
        return Decision(violation, defer_until=until)
    if defer:
        violation = Violation(
            violation.reason,
            violation.rule,
            f"{violation.detail}; waiting until {until.isoformat()} would exceed max_delay "
            f"{plan.delivery.max_delay}",
            violation.field,
        )
    return Decision(violation)


def check_send(
    plan: Plan,
    policy: Policy,
    *,
    user: str,
    rendered: Mapping[str, str],
    variables: Mapping[str, object],
    due_at: datetime,
    now: datetime,
    tz: ZoneInfo,
) -> Decision:
    """Steps 4-6 on one rendered message about to be sent `now` (aware) to `user` in `tz`; when
    they pass, the counters of step 7 (the gate counts them atomically, see `on_capped`)."""
    stop = message_violation(plan, policy, rendered)
    if stop is not None:
        return Decision(stop)
    return moment_decision(
        plan,
        policy,
        user=user,
        rendered=rendered,
        variables=variables,
        due_at=due_at,
        now=now,
        tz=tz,
    )


def message_violation(plan: Plan, policy: Policy, rendered: Mapping[str, str]) -> Violation | None:
    """Steps 4-5, which depend on the rendered message only (a fan-out may reuse the answer
    for every user who gets the same text)."""
    stop = category_rule(plan, policy) or content_rules(plan, rendered, policy)
    return stop or field_rules(plan, rendered)


def moment_decision(
    plan: Plan,
    policy: Policy,
    *,
    user: str,
    rendered: Mapping[str, str],
    variables: Mapping[str, object],
    due_at: datetime,
    now: datetime,
    tz: ZoneInfo,
    limits: Limits | None = None,
) -> Decision:
    """Step 6 (quiet hours) at `now` in the user's zone, then the counters of step 7.
    `limits` is `plan_limits(plan, policy)`, when the caller has it at hand."""
    require_aware(due_at, "due time")
    local = require_aware(now, "now").astimezone(tz)
    limits = limits or plan_limits(plan, policy)
    window = limits.quiet
    opening = quiet_hours(local, window)
    if opening is not None:
        violation = Violation(
            Reason.QUIET_HOURS,
            "quiet_hours",
            f"{local:%H:%M} is inside the quiet hours {window} ({tz.key}), which end at "
            f"{opening:%Y-%m-%d %H:%M}",
        )
        return defer_or_skip(
            plan, violation, plan.delivery.on_quiet_hours == "defer", opening, due_at
        )
    key_value = limit_key_value(plan, variables, rendered)
    return Decision(counters=cap_counters(plan, policy, user, now, tz, key_value, limits))


def on_capped(plan: Plan, counter: CapCounter, due_at: datetime) -> Decision:
    """What to do with a send whose `counter` is full: skip, or defer to the counter's reset
    (if that is within the plan's max_delay of `due_at`)."""
    violation = Violation(Reason.CAPPED, counter.key.split(":", 1)[0], counter.detail())
    return defer_or_skip(
        plan, violation, plan.delivery.on_capped == "defer", counter.resets_at, due_at
    )


# --- what `preview` shows: one user's timeline through the rules ------------------------------


@dataclass(frozen=True)
class DryRun:
    occurrence: Occurrence
    message: dict[str, str] | None  # None: unrenderable (see `error`)
    error: str | None
    decision: Decision  # the final one: go, or skipped
    sent_at: datetime | None  # when it would go (later than due if it was deferred)
    deferred: Violation | None = None  # why it was deferred first, if it was
    variant: str | None = None  # the step's variant this user gets (None: its only content)


def dry_run(
    plan: Plan,
    policy: Policy,
    occurrences: Iterable[Occurrence],
    tz: ZoneInfo,
    variables: Mapping[str, object],
    user: str = "preview-user",
) -> Iterator[DryRun]:
    """One user's occurrences through the gate, in step order, with caps counted from this plan's
    own sends only (the other plans a user is in are not known here).

    Sends are decided in time order, as the daemon meets them: a deferred send competes for a cap
    with the occurrences due before it goes. At one moment a send deferred earlier goes before a
    new one, and deferred sends go in the order they were due (Dispatcher.fire retries the due
    deferrals before it fans out; tests/integration/test_gate_properties.py holds both to it)."""
    counts: Counter[str] = Counter()
    upcoming = iter(occurrences)
    waiting: list[tuple[datetime, int, datetime, int, _Pending]] = []  # a heap, see _Pending
    done: dict[int, DryRun] = {}
    order: list[int] = []  # steps in the order they came

    def take(occurrence: Occurrence) -> None:
        order.append(occurrence.step)
        variant = variant_for(plan, occurrence.step, user)
        try:
            message = render(plan, occurrence.step, occurrence.due_at, tz, user, variables, variant)
        except RenderError as exc:
            done[occurrence.step] = DryRun(
                occurrence, None, str(exc), Decision(), None, variant=variant
            )
            return
        due = occurrence.due_at
        heapq.heappush(waiting, (due, 1, due, occurrence.step, _Pending(occurrence, message)))

    following = next(upcoming, None)
    while waiting or following is not None:
        # Every occurrence due by the earliest waiting send joins first: it may be decided first.
        while following is not None and (not waiting or following.due_at <= waiting[0][0]):
            take(following)
            following = next(upcoming, None)
        if waiting:
            now, _, due, step, pending = heapq.heappop(waiting)
            decision = _decide(plan, policy, pending, now, tz, user, variables, counts)
            if decision.defer_until is not None and pending.deferrals < 4:
                # a deferral may meet the next rule: quiet hours, then a cap
                pending.deferrals += 1
                pending.deferred = pending.deferred or decision.violation
                heapq.heappush(waiting, (decision.defer_until, 0, due, step, pending))
            else:
                if decision.go:
                    counts.update(c.key for c in decision.counters)
                sent_at = now if decision.go else None
                done[step] = DryRun(
                    pending.occurrence,
                    pending.message,
                    None,
                    decision,
                    sent_at,
                    pending.deferred,
                    variant_for(plan, step, user),
                )
        while order and order[0] in done:  # in step order, each as soon as it is final
            yield done.pop(order.pop(0))


@dataclass
class _Pending:
    """A send of `dry_run` waiting for its moment. Heap entries are (moment, 0 for a deferred
    send and 1 for a new one, due time, step, this): the order the daemon decides them in."""

    occurrence: Occurrence
    message: dict[str, str]
    deferrals: int = 0
    deferred: Violation | None = None


def _decide(
    plan: Plan,
    policy: Policy,
    pending: _Pending,
    now: datetime,
    tz: ZoneInfo,
    user: str,
    variables: Mapping[str, object],
    counts: Counter[str],
) -> Decision:
    """What the gate does with one send at `now`: go, defer (quiet hours, then a cap) or skip."""
    decision = check_send(
        plan,
        policy,
        user=user,
        rendered=pending.message,
        variables=variables,
        due_at=pending.occurrence.due_at,
        now=now,
        tz=tz,
    )
    full = next((c for c in decision.counters if counts[c.key] >= c.limit), None)
    return on_capped(plan, full, pending.occurrence.due_at) if full is not None else decision


# --- static checks (`reminders validate`) -------------------------------------------------------

STATIC_HORIZON = timedelta(weeks=8)
_MAX_SAMPLED = 20_000
SAMPLE_ZONE = "Asia/Shanghai"  # relative plans: local times are the same in every user's zone


def sample_occurrences(
    plan: Plan, now: datetime, horizon: timedelta = STATIC_HORIZON
) -> tuple[list[Occurrence], ZoneInfo]:
    """The plan's occurrences over its first `horizon` (from its start, or from `now`), and the
    zone they are local to (a relative plan is sampled as one user enrolled `now`)."""
    if plan.schedule.calendar is not None:
        cal = plan.schedule.calendar
        tz = ZoneInfo(cal.timezone)
        anchor = calendar_anchor(cal, now)
        found = calendar_occurrences(cal, anchor)
    else:
        tz, anchor = ZoneInfo(SAMPLE_ZONE), require_aware(now, "now")
        found = relative_occurrences(plan, anchor, tz)
    end = anchor + horizon
    sampled = []
    for occurrence in islice(found, _MAX_SAMPLED):
        if occurrence.due_at >= end:
            break
        sampled.append(occurrence)
    return sampled, tz


def _first_over(moments: list[datetime], window: str, limit: int) -> tuple[int, str] | None:
    """The first window (a day, an ISO week...) with more than `limit` moments, and its count:
    the one to fix first (labels sort in time order: 2026-12-21, 2026-W52, 2026-12)."""
    counts = Counter(_WINDOWS[window](m)[0] for m in moments)
    return next(((counts[k], k) for k in sorted(counts) if counts[k] > limit), None)


_IN = {"day": "on", "week": "in week", "month": "in month", "year": "in"}


def _schedule_cap_violations(plan: Plan, limits: Limits, local: list[datetime]) -> list[Violation]:
    category = plan.category.value
    checks: list[tuple[str, int | None, str, str]] = [
        ("day", limits.user_day, "user_day", "per user per day, all plans together"),
        ("week", limits.category_week, "category_week", f"{category} messages per user per week"),
        ("day", limits.plan_day, "plan_day", "per user per day from this plan"),
        ("week", limits.plan_week, "plan_week", "per user per week from this plan"),
    ]
    if limits.limited is not None:
        what = f"per {plan.delivery.limit_key} per {limits.limited.per} (limited long-term kind)"
        checks.append((limits.limited.per, limits.limited.sends, "limited_long_term", what))
    found = []
    for window, limit, rule, what in checks:
        over = _first_over(local, window, limit) if limit is not None else None
        if over is not None:
            most, label = over
            found.append(
                Violation(
                    Reason.CAPPED,
                    rule,
                    f"the schedule sends {most} messages {_IN[window]} {label}, over the cap of "
                    f"{limit} "
                    f"{what}: make it sparser, or grant the plan an exception in policy.yaml",
                    field="schedule",
                )
            )
    return found


def _schedule_quiet_violations(
    plan: Plan, limits: Limits, local: list[datetime]
) -> list[Violation]:
    relative = plan.schedule.relative
    if relative is not None and relative.at is None:
        return []  # the time of day is each enrolment's own: only the gate can tell
    quiet = sorted({f"{m:%H:%M}" for m in local if quiet_hours(m, limits.quiet) is not None})
    if not quiet:
        return []
    zone = "the user's time zone" if relative is not None else local[0].tzinfo
    action = "deferred" if plan.delivery.on_quiet_hours == "defer" else "skipped"
    return [
        Violation(
            Reason.QUIET_HOURS,
            "quiet_hours",
            f"the schedule sends at {', '.join(quiet)} ({zone}), inside the "
            f"{plan.category.value} quiet hours {limits.quiet}: those messages would be "
            f"{action}; move them, or set the quiet hours in policy.yaml",
            field="schedule",
        )
    ]


def _message_violations(
    plan: Plan, policy: Policy, sampled: list[Occurrence], tz: ZoneInfo, now: datetime
) -> list[Violation]:
    """Content and field rules on each message variant, per-user variables left empty."""
    per_user = set(plan.variables) | {"user"}
    empty = dict.fromkeys(plan.variables, "")
    last = plan.occurrence_limit
    steps = sorted({1, *plan.message.steps, *([last] if last else [])})
    due_by_step = {o.step: o.due_at for o in sampled}
    found: dict[tuple[str | None, str], Violation] = {}
    # Each extra step is checked as sent at step 1 (its texts do not depend on the step).
    messages: list[tuple[int, str | None]] = [(step, None) for step in steps]
    messages += [(1, name) for name in plan.message.extra]
    for step, extra in messages:
        due = due_by_step.get(step) or (sampled[-1].due_at if sampled else now)
        choices = plan.message.variants_of(step) if extra is None else None
        # Every variant of the step is a message some users get: each meets every rule.
        for variant in sorted(choices[1]) if choices is not None else [None]:
            try:
                message = render(plan, step, due, tz, "", empty, variant, extra=extra)
            except RenderError:
                continue  # a format spec that needs the user's value: only the gate can tell

            texts = plan.message.texts(step, variant, extra=extra)
            fixed = {k for k, text in texts.items() if not per_user & set(placeholders(text))}
            fields = [
                v
                for v in field_violations(plan, message)
                # A field with a per-user variable: only a thing's fixed text, already too long.
                if v.field in fixed
                or (_type_of(plan, v.field) == "thing" and message[v.field or ""])
            ]
            for violation in content_violations(plan, message, policy) + fields:
                path = _message_path(plan, violation.field, step, variant, extra)
                found.setdefault((path, violation.rule), _at(violation, path, step, variant, extra))
    return list(found.values())


def _message_path(
    plan: Plan, key: str | None, step: int, variant: str | None = None, extra: str | None = None
) -> str:
    """Where a field's text of `step` (in `variant`, or of the extra step) is written in the
    plan file."""
    if key is None:
        return "message"
    return plan.message.path_of(step, key, variant, extra=extra)


def _type_of(plan: Plan, key: str | None) -> str | None:
    return plan.template.fields.get(key or "")


def _at(
    violation: Violation,
    path: str,
    step: int,
    variant: str | None = None,
    extra: str | None = None,
) -> Violation:
    if extra is not None:
        where = f"extra step {extra}"
    else:
        where = f"step {step}" if variant is None else f"step {step}, variant {variant}"
    return Violation(violation.reason, violation.rule, f"{violation.detail} ({where})", path)


def static_violations(
    plan: Plan, policy: Policy, now: datetime, horizon: timedelta = STATIC_HORIZON
) -> list[Violation]:
    """What `reminders validate` rejects: every rule a plan breaks without any user, each with
    the plan field at fault (`Violation.field`)."""
    found = [v for v in [category_rule(plan, policy)] if v is not None]
    found += looser_caps(plan, policy)
    limits = plan_limits(plan, policy)
    sampled, tz = sample_occurrences(plan, now, horizon)
    local = [o.due_at.astimezone(tz) for o in sampled]
    found += _schedule_cap_violations(plan, limits, local)
    found += _schedule_quiet_violations(plan, limits, local)
    found += _message_violations(plan, policy, sampled, tz, now)
    return found


__all__ = [
    "CapCounter",
    "Decision",
    "DryRun",
    "Limits",
    "Violation",
    "cap_counters",
    "category_rule",
    "check_send",
    "content_rules",
    "content_violations",
    "dry_run",
    "field_rules",
    "field_violations",
    "limit_key_value",
    "local_moment",
    "looser_caps",
    "on_capped",
    "plan_limits",
    "quiet_hours",
    "sample_occurrences",
    "static_violations",
]
