"""The pure rules before every send (scheduler/domain/rules.py): each rule with examples and
counter-examples, quiet hours and cap windows across DST changes and week boundaries."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import Plan
from scheduler.domain.policy import Policy, QuietWindow
from scheduler.domain.rules import (
    cap_counters,
    category_rule,
    check_send,
    content_rules,
    dry_run,
    field_rules,
    looser_caps,
    on_capped,
    plan_limits,
    quiet_hours,
    static_violations,
)
from scheduler.domain.schedule import Occurrence

NY = ZoneInfo("America/New_York")
SH = ZoneInfo("Asia/Shanghai")
POLICY = Policy()
NIGHT = QuietWindow(start=time(22), end=time(8))


def plan(**changes: Any) -> Plan:
    """A valid long-term government plan, changed by `changes` (top-level fields)."""
    data: dict[str, Any] = {
        "id": "p",
        "name": "Plan",
        "category": "government",
        "consent": "long_term",
        "variables": ["no"],
        "schedule": {
            "calendar": {"timezone": "Asia/Shanghai", "monthly": {"day": 5, "at": "09:00"}}
        },
        "template": {"id": "t", "fields": {"thing1": "thing", "thing2": "thing"}},
        "message": {"default": {"thing1": "养老金已发放", "thing2": "请查收"}},
    }
    data.update(changes)
    return Plan.model_validate(data)


# --- 4. category ----------------------------------------------------------------------------------

CATEGORY_CASES = [
    ("government", "long_term", {}, None),
    ("medical", "long_term", {}, None),
    ("transport", "long_term", {}, None),
    ("education", "long_term", {}, None),
    ("finance", "long_term", {"limit_key": "no"}, None),
    ("finance", "long_term", {}, "limited_long_term"),
    ("commerce", "long_term", {}, "long_term_category"),
    ("catering", "long_term", {}, "long_term_category"),
    ("other", "long_term", {}, "long_term_category"),
    ("commerce", "one_time", {}, None),
    ("finance", "one_time", {}, None),
]


@pytest.mark.parametrize(("category", "consent", "delivery", "rule"), CATEGORY_CASES)
def test_category_rule(category: str, consent: str, delivery: dict, rule: str | None) -> None:
    violation = category_rule(plan(category=category, consent=consent, delivery=delivery), POLICY)
    assert (violation.rule if violation else None) == rule
    if violation:
        assert violation.reason == Reason.CATEGORY


def test_the_policy_decides_which_categories_are_long_term() -> None:
    policy = Policy(long_term_categories=["commerce"], limited_long_term={"finance": None})
    assert category_rule(plan(category="commerce"), policy) is None
    violation = category_rule(plan(category="government"), policy)
    assert violation is not None and "allowed: commerce" in violation.detail


# --- 5. content -----------------------------------------------------------------------------------

CONTENT_CASES = [
    # (category, consent, fields, rule or None)
    ("government", "long_term", {"thing1": "养老金已发放"}, None),
    ("government", "long_term", {"thing1": "本月限时优惠"}, "promotional"),
    ("government", "long_term", {"thing1": "Big SALE today"}, "promotional"),
    ("government", "long_term", {"thing1": "ＳＡＬＥ now"}, "promotional"),  # full-width
    ("government", "long_term", {"thing1": "coupons inside"}, "promotional"),  # plural
    ("government", "long_term", {"thing1": "wholesale market closed"}, None),  # whole words
    ("government", "one_time", {"thing1": "本月限时优惠"}, None),  # long-term reminders only
    ("medical", "one_time", {"thing1": "第1周训练", "thing2": "仅供参考"}, None),
    ("medical", "one_time", {"thing1": "week 1", "thing2": "Not a diagnosis."}, None),
    ("medical", "one_time", {"thing1": "第1周训练", "thing2": "请按时训练"}, "disclaimer"),
    ("finance", "one_time", {"thing1": "理财产品到期"}, None),
    ("finance", "one_time", {"thing1": "保本理财到期"}, "forbidden_claim"),
    ("finance", "one_time", {"thing1": "Guaranteed returns!"}, "forbidden_claim"),
    ("education", "one_time", {"thing1": "保本理财"}, None),  # a finance rule only
]


@pytest.mark.parametrize(("category", "consent", "fields", "rule"), CONTENT_CASES)
def test_content_rules(category: str, consent: str, fields: dict, rule: str | None) -> None:
    violation = content_rules(plan(category=category, consent=consent), fields, POLICY)
    assert (violation.rule if violation else None) == rule
    if violation:
        assert violation.reason == Reason.CONTENT


def test_content_rule_details_name_the_field_and_the_words() -> None:
    violation = content_rules(plan(), {"thing1": "ok", "thing2": "双十一促销"}, POLICY)
    assert violation is not None and violation.field == "thing2"
    assert violation.detail.startswith("thing2 contains the promotional word '促销'")
    missing = content_rules(plan(category="medical"), {"thing1": "x"}, POLICY)
    assert missing is not None
    assert missing.detail.startswith("medical message lacks the disclaimer: none of '仅供参考'")


def test_extra_promotional_words_extend_the_defaults() -> None:
    policy = Policy.model_validate({"content": {"extra_promotional_words": ["会员日"]}})
    assert content_rules(plan(), {"thing1": "会员日来了"}, policy) is not None
    assert content_rules(plan(), {"thing1": "大促"}, policy) is not None


# --- 5. template fields ---------------------------------------------------------------------------

FIELD_CASES = [
    ({"thing1": "x" * 20, "thing2": "ok"}, None),
    ({"thing1": "x" * 21, "thing2": "ok"}, "thing1: thing allows at most 20 characters, got 21"),
    ({"thing1": "ok", "thing2": ""}, "thing2: value is empty"),
    ({"thing1": "a\nb", "thing2": "ok"}, "thing1: control characters are not allowed"),
]


@pytest.mark.parametrize(("fields", "detail"), FIELD_CASES)
def test_field_rules_reuse_check_value(fields: dict, detail: str | None) -> None:
    violation = field_rules(plan(), fields)
    if detail is None:
        assert violation is None
    else:
        assert violation is not None and violation.reason == Reason.FIELD
        assert violation.detail.startswith(detail)


# --- 6. quiet hours -------------------------------------------------------------------------------


def ny(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=NY, fold=fold)


QUIET_CASES = [
    # (local moment, window, next allowed moment or None)
    (ny(2026, 6, 1, 12, 0), NIGHT, None),
    (ny(2026, 6, 1, 8, 0), NIGHT, None),  # the end is open
    (ny(2026, 6, 1, 21, 59), NIGHT, None),
    (ny(2026, 6, 1, 22, 0), NIGHT, ny(2026, 6, 2, 8, 0)),
    (ny(2026, 6, 1, 23, 30), NIGHT, ny(2026, 6, 2, 8, 0)),
    (ny(2026, 6, 2, 3, 0), NIGHT, ny(2026, 6, 2, 8, 0)),
    (ny(2026, 6, 1, 13, 0), QuietWindow(start=time(12), end=time(14)), ny(2026, 6, 1, 14, 0)),
    (ny(2026, 6, 1, 3, 0), QuietWindow(start=time(8), end=time(8)), None),  # no quiet hours
    # Spring forward (8 March 2026, 02:00 -> 03:00): the opening keeps its wall-clock time.
    (ny(2026, 3, 7, 23, 0), NIGHT, ny(2026, 3, 8, 8, 0)),
    # ... and an opening inside the gap moves past it.
    (ny(2026, 3, 8, 1, 30), QuietWindow(start=time(22), end=time(2, 30)), ny(2026, 3, 8, 3, 30)),
    # Fall back (1 November 2026, 02:00 -> 01:00).
    (ny(2026, 10, 31, 23, 0), NIGHT, ny(2026, 11, 1, 8, 0)),
    # Inside the repeated hour: the first 01:15 waits for the first 01:30 ...
    (ny(2026, 11, 1, 1, 15), QuietWindow(start=time(0), end=time(1, 30)), ny(2026, 11, 1, 1, 30)),
    # ... and the second 01:15 (EST) for the second 01:30, not the earlier first one.
    (
        ny(2026, 11, 1, 1, 15, fold=1),
        QuietWindow(start=time(0), end=time(1, 30)),
        ny(2026, 11, 1, 1, 30, fold=1),
    ),
]


@pytest.mark.parametrize(("local", "window", "expected"), QUIET_CASES)
def test_quiet_hours(local: datetime, window: QuietWindow, expected: datetime | None) -> None:
    opening = quiet_hours(local, window)
    if expected is None:
        assert opening is None
    else:
        assert opening is not None
        assert opening.astimezone(UTC) == expected.astimezone(UTC)
        assert opening.utcoffset() == expected.utcoffset()


def test_quiet_hours_rejects_naive_times() -> None:
    with pytest.raises(ValueError, match="must carry a time zone"):
        quiet_hours(datetime(2026, 6, 1, 23), NIGHT)


ZONES = ["America/New_York", "Europe/London", "Asia/Shanghai", "Australia/Lord_Howe"]
TIMES = st.times().map(lambda t: t.replace(microsecond=0, second=0))


@given(
    instant=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 1, 1)),
    zone=st.sampled_from(ZONES),
    start=TIMES,
    end=TIMES,
)
def test_quiet_hours_opening_is_later_allowed_and_within_a_day(
    instant: datetime, zone: str, start: time, end: time
) -> None:
    window = QuietWindow(start=start, end=end)
    local = instant.replace(tzinfo=UTC).astimezone(ZoneInfo(zone))
    opening = quiet_hours(local, window)
    if opening is None:
        return
    assert opening.astimezone(UTC) > local.astimezone(UTC)
    assert opening.astimezone(UTC) - local.astimezone(UTC) <= timedelta(hours=25)
    assert quiet_hours(opening, window) is None


# --- 7. caps --------------------------------------------------------------------------------------


def keys(plan_: Plan, at: datetime, tz: ZoneInfo, policy: Policy = POLICY) -> dict[str, Any]:
    return {c.key: (c.limit, c.resets_at) for c in cap_counters(plan_, policy, "u1", at, tz, "P7")}


def test_cap_counters_use_the_users_local_day_and_iso_week() -> None:
    # 03:30 UTC on Monday 2 March 2026 is still Sunday 1 March in New York (ISO week 9).
    at = datetime(2026, 3, 2, 3, 30, tzinfo=UTC)
    counters = keys(plan(category="medical"), at, NY)
    assert counters == {
        "user-day:u1:2026-03-01": (2, ny(2026, 3, 2, 0, 0)),
        "user-category-week:u1:medical:2026-W09": (2, ny(2026, 3, 2, 0, 0)),
    }
    # The same instant is Monday in Shanghai: another day and another week.
    assert set(keys(plan(category="medical"), at, SH)) == {
        "user-day:u1:2026-03-02",
        "user-category-week:u1:medical:2026-W10",
    }


def test_cap_windows_across_dst_changes() -> None:
    # Sunday 8 March 2026 (spring forward) has 23 hours in New York; its day ends at midnight EDT.
    before, after = ny(2026, 3, 8, 0, 30), ny(2026, 3, 8, 23, 30)
    assert keys(plan(), before, NY).keys() == keys(plan(), after, NY).keys()
    [(_, day_end), _] = keys(plan(), before, NY).values()
    assert day_end == ny(2026, 3, 9, 0, 0) and day_end.utcoffset() == timedelta(hours=-4)
    # Sunday 1 November (fall back) has 25 hours: both 01:30s fall on the same day.
    first, second = ny(2026, 11, 1, 1, 30), ny(2026, 11, 1, 1, 30, fold=1)
    assert keys(plan(), first, NY).keys() == keys(plan(), second, NY).keys()


def test_year_end_belongs_to_the_iso_week() -> None:
    # Thursday 31 December 2026 is in ISO week 53 of 2026; Friday 1 January 2027 too.
    a = keys(plan(category="education"), datetime(2026, 12, 31, 12, tzinfo=SH), SH)
    b = keys(plan(category="education"), datetime(2027, 1, 1, 12, tzinfo=SH), SH)
    assert "user-category-week:u1:education:2026-W53" in a
    assert "user-category-week:u1:education:2026-W53" in b


def test_plan_caps_and_the_finance_key_add_counters() -> None:
    finance = plan(
        category="finance",
        delivery={"limit_key": "no", "caps": {"plan_week": 1, "user_day": 1}},
    )
    counters = keys(finance, datetime(2026, 12, 31, 23, 59, tzinfo=SH), SH)
    assert counters == {
        "user-day:u1:2026-12-31": (1, datetime(2027, 1, 1, tzinfo=SH)),
        "user-category-week:u1:finance:2026-W53": (14, datetime(2027, 1, 4, tzinfo=SH)),
        "plan-week:p:u1:2026-W53": (1, datetime(2027, 1, 4, tzinfo=SH)),
        "limit-key:finance:u1:P7:2026-12": (1, datetime(2027, 1, 1, tzinfo=SH)),
    }


@given(
    instant=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 1, 1)),
    zone=st.sampled_from(ZONES),
)
def test_every_cap_window_resets_after_the_send_and_keys_match_local_calendar(
    instant: datetime, zone: str
) -> None:
    tz = ZoneInfo(zone)
    at = instant.replace(tzinfo=UTC)
    local = at.astimezone(tz)
    finance = plan(category="finance", delivery={"limit_key": "no"})
    for counter in cap_counters(finance, POLICY, "u", at, tz, "k"):
        assert counter.resets_at.astimezone(UTC) > at
        # Just before the reset is still the same window; at the reset a new one starts.
        just_before = counter.resets_at.astimezone(UTC) - timedelta(seconds=1)
        same = {c.key for c in cap_counters(finance, POLICY, "u", just_before, tz, "k")}
        after = {c.key for c in cap_counters(finance, POLICY, "u", counter.resets_at, tz, "k")}
        assert counter.key in same and counter.key not in after
    assert f"user-day:u:{local.date().isoformat()}" in {
        c.key for c in cap_counters(finance, POLICY, "u", at, tz, "k")
    }


LIMIT_CASES = [
    # (policy, plan delivery caps, expected user_day, category_week, plan_week)
    ({}, {}, 2, 14, None),
    ({}, {"user_day": 1, "plan_week": 2}, 1, 14, 2),
    ({}, {"user_day": 5}, 2, 14, None),  # looser than the policy: ignored (and reported)
    ({"exceptions": {"p": {"reason": "r", "user_day": 3}}}, {}, 3, 14, None),
    ({"exceptions": {"p": {"reason": "r", "user_day": 3}}}, {"user_day": 3}, 3, 14, None),
    ({"exceptions": {"other": {"reason": "r", "user_day": 3}}}, {}, 2, 14, None),
]


@pytest.mark.parametrize(("policy", "caps", "user_day", "category_week", "plan_week"), LIMIT_CASES)
def test_a_plan_may_be_stricter_never_looser_unless_excepted(
    policy: dict, caps: dict, user_day: int, category_week: int, plan_week: int | None
) -> None:
    p, pol = plan(delivery={"caps": caps}), Policy.model_validate(policy)
    limits = plan_limits(p, pol)
    assert (limits.user_day, limits.category_week, limits.plan_week) == (
        user_day,
        category_week,
        plan_week,
    )
    looser = looser_caps(p, pol)
    assert bool(looser) == (caps.get("user_day", 0) > user_day)


# --- the gate's decision --------------------------------------------------------------------------


def decide(p: Plan, now: datetime, fields: dict | None = None, due: datetime | None = None):  # noqa: ANN201
    return check_send(
        p,
        POLICY,
        user="u1",
        rendered=fields or {"thing1": "养老金已发放", "thing2": "请查收"},
        variables={"no": "P7"},
        due_at=due or now,
        now=now,
        tz=SH,
    )


def test_check_send_goes_with_its_counters() -> None:
    decision = decide(plan(), datetime(2026, 3, 5, 9, tzinfo=SH))
    assert decision.go and decision.outcome is None
    assert [c.key.split(":")[0] for c in decision.counters] == ["user-day", "user-category-week"]


def test_check_send_runs_the_rules_in_the_pipelines_order() -> None:
    night = datetime(2026, 3, 5, 23, tzinfo=SH)
    bad = {"thing1": "x" * 21, "thing2": "促销"}
    assert decide(plan(category="commerce"), night, bad).violation.reason == Reason.CATEGORY
    assert decide(plan(), night, bad).violation.reason == Reason.CONTENT
    assert decide(plan(), night, {"thing1": "x" * 21, "thing2": "ok"}).violation.reason == (
        Reason.FIELD
    )
    assert decide(plan(), night).violation.reason == Reason.QUIET_HOURS


def test_quiet_hours_defer_within_max_delay_then_skip() -> None:
    night = datetime(2026, 3, 5, 23, tzinfo=SH)
    deferred = decide(plan(), night)
    assert deferred.outcome == Outcome.DEFERRED
    assert deferred.defer_until == datetime(2026, 3, 6, 8, tzinfo=SH)
    short = plan(delivery={"max_delay": "2 hours"})
    skipped = decide(short, night)
    assert skipped.outcome == Outcome.SKIPPED and "would exceed max_delay 2 hours" in (
        skipped.violation.detail
    )
    assert decide(plan(delivery={"on_quiet_hours": "skip"}), night).outcome == Outcome.SKIPPED


def test_a_full_counter_skips_or_defers_to_its_reset() -> None:
    due = datetime(2026, 3, 5, 20, tzinfo=SH)
    [day, _] = decide(plan(), due).counters
    skipped = on_capped(plan(), day, due)
    assert skipped.outcome == Outcome.SKIPPED and skipped.violation.reason == Reason.CAPPED
    assert skipped.violation.detail == "at most 2 per user per day (2026-03-05) reached"
    deferred = on_capped(plan(delivery={"on_capped": "defer"}), day, due)
    assert deferred.defer_until == datetime(2026, 3, 6, tzinfo=SH)


def test_dry_run_counts_the_plans_own_sends() -> None:
    daily = plan(
        category="medical",
        consent="one_time",
        schedule={"calendar": {"daily": {"at": "09:00"}}},
        message={"default": {"thing1": "训练提醒", "thing2": "仅供参考"}},
    )
    start = datetime(2026, 3, 2, 9, tzinfo=SH)  # a Monday
    occurrences = [Occurrence(n + 1, start + timedelta(days=n)) for n in range(8)]
    runs = list(dry_run(daily, POLICY, occurrences, SH, {"no": "1"}))
    reasons = [r.decision.violation.rule if r.decision.violation else "sent" for r in runs]
    # medical: 2 per week; the next week starts on Monday 9 March
    assert reasons == ["sent", "sent"] + ["user-category-week"] * 5 + ["sent"]


# --- static checks --------------------------------------------------------------------------------

NOW = datetime(2026, 11, 20, tzinfo=UTC)


def test_static_violations_of_a_daily_medical_plan() -> None:
    daily = plan(
        category="medical",
        schedule={"calendar": {"daily": {"at": "21:30"}}},
        message={"default": {"thing1": "训练提醒", "thing2": "x" * 21}},
    )
    found = {(v.field, v.rule) for v in static_violations(daily, POLICY, NOW)}
    assert found == {
        ("schedule", "category_week"),
        ("message", "disclaimer"),
        ("message.default.thing2", "field"),
    }


def test_static_checks_leave_per_user_values_to_the_gate() -> None:
    p = plan(message={"default": {"thing1": "{no}", "thing2": "第{step}期 {no}"}})
    assert static_violations(p, POLICY, NOW) == []
    too_long = plan(message={"default": {"thing1": "{no}", "thing2": "{no}" + "期" * 21}})
    [violation] = static_violations(too_long, POLICY, NOW)
    assert violation.field == "message.default.thing2"


def test_static_quiet_hours_use_the_category_window() -> None:
    early = {"calendar": {"weekly": {"days": ["mon"], "at": "07:30"}}}
    assert static_violations(plan(category="transport", schedule=early), POLICY, NOW) == []
    [violation] = static_violations(plan(schedule=early), POLICY, NOW)
    assert violation.reason == Reason.QUIET_HOURS and "07:30" in violation.detail
