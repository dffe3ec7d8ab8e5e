"""Adapt rules: their validation (errors name the field) and which rule decides, as pure
functions of what was last reported of a user and a `now`."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from scheduler.cli import main
from scheduler.domain.adapt import NEVER_SEEN, Seen, decide, extra_occurrence
from scheduler.domain.messages import render
from scheduler.domain.plan import Plan
from scheduler.domain.policy import DEFAULT_POLICY
from scheduler.domain.rules import static_violations
from scheduler.errors import PlanError
from scheduler.planfiles import content_hash, parse_plan

NOW = datetime(2026, 3, 16, 1, 0, tzinfo=UTC)
DAY = timedelta(days=1)

BASE: dict[str, Any] = {
    "id": "rehab",
    "name": "Rehab",
    "category": "medical",
    "consent": "one_time",
    "schedule": {"relative": {"every": "1 week", "count": 4, "at": "09:00"}},
    "template": {"id": "t", "fields": {"thing1": "thing", "thing2": "thing"}},
    "message": {
        "default": {"thing1": "第{step}周康复训练", "thing2": "仅供参考，不构成诊断"},
        "extra": {"encouragement": {"thing1": "{patient}，坚持就是胜利"}},
    },
    "variables": ["patient"],
    "adapt": [
        {"if": {"inactive_for": "7 days"}, "send": "encouragement"},
        {"if": {"active_within": "1 day"}, "skip": True},
    ],
}


def plan(**changes: Any) -> Plan:
    document = copy.deepcopy(BASE)
    document.update(changes)
    return Plan.model_validate(document)


def problems(**changes: Any) -> list[tuple[str, str]]:
    import yaml

    document = copy.deepcopy(BASE)
    document.update(changes)
    with pytest.raises(PlanError) as caught:
        parse_plan(yaml.safe_dump(document, allow_unicode=True), "plans/rehab.yaml")
    return [(p.field, p.reason) for p in caught.value.problems]


def test_the_first_matching_rule_decides() -> None:
    rules = plan().adapt
    inactive = Seen(last_activity=NOW - 8 * DAY)
    active = Seen(last_open=NOW - timedelta(hours=3), last_activity=NOW - 5 * DAY)

    sent = decide(rules, inactive, NOW)
    skipped = decide(rules, active, NOW)

    assert sent is not None and (sent.rule, sent.send, sent.skip) == (0, "encouragement", False)
    assert sent.period == NOW - 8 * DAY  # the inactivity began when the user was last seen
    assert sent.detail == (
        "adapt.0 (inactive_for 7 days: send encouragement): last open never, "
        "last activity 2026-03-08 01:00 UTC"
    )
    assert skipped is not None and (skipped.rule, skipped.send, skipped.skip) == (1, None, True)
    assert skipped.detail.startswith("adapt.1 (active_within 1 day: skip): last open 2026-03-15")


def test_a_user_in_between_or_never_seen_follows_the_plain_timeline() -> None:
    rules = plan().adapt
    assert decide(rules, Seen(last_activity=NOW - 3 * DAY), NOW) is None
    assert decide(rules, NEVER_SEEN, NOW) is None  # nothing ever reported: not "inactive"
    assert decide([], Seen(last_open=NOW), NOW) is None


def test_windows_include_their_bounds_and_an_open_is_activity() -> None:
    rules = plan().adapt
    assert decide(rules, Seen(last_open=NOW - 7 * DAY), NOW).rule == 0  # type: ignore[union-attr]
    assert decide(rules, Seen(last_activity=NOW - DAY), NOW).rule == 1  # type: ignore[union-attr]
    assert decide(rules, Seen(last_activity=NOW - DAY - timedelta(seconds=1)), NOW) is None
    # the later of the two counts: an old activity, a recent open
    seen = Seen(last_open=NOW - timedelta(hours=1), last_activity=NOW - 30 * DAY)
    assert decide(rules, seen, NOW).rule == 1  # type: ignore[union-attr]


def test_opened_within_counts_only_opens_and_conditions_combine() -> None:
    rules = plan(
        adapt=[
            {"if": {"opened_within": "2 days"}, "skip": True},
            {"if": {"active_within": "2 days", "inactive_for": "1 day"}, "send": "encouragement"},
        ]
    ).adapt
    assert decide(rules, Seen(last_activity=NOW - DAY / 2), NOW) is None
    assert decide(rules, Seen(last_open=NOW - DAY), NOW).rule == 0  # type: ignore[union-attr]
    both = decide(rules, Seen(last_activity=NOW - 1.5 * DAY), NOW)
    assert both is not None and both.rule == 1


def test_an_extra_step_is_keyed_by_its_inactivity_period() -> None:
    rules = plan().adapt
    first = decide(rules, Seen(last_activity=NOW - 8 * DAY), NOW)
    a_week_later = decide(rules, Seen(last_activity=NOW - 8 * DAY), NOW + 7 * DAY)
    after_a_return = decide(rules, Seen(last_activity=NOW - DAY), NOW + 7 * DAY)
    assert first is not None and a_week_later is not None and after_a_return is not None
    key = extra_occurrence("encouragement", first, 2)
    assert key == "extra:encouragement:since:2026-03-08T01:00:00+00:00"
    assert extra_occurrence("encouragement", a_week_later, 3) == key  # the same period: once
    assert extra_occurrence("encouragement", after_a_return, 3) != key


def test_an_extra_step_renders_over_the_defaults() -> None:
    tz = ZoneInfo("Asia/Shanghai")
    data = render(plan(), 2, NOW, tz, "o-1", {"patient": "张三"}, extra="encouragement")
    assert data == {"thing1": "张三，坚持就是胜利", "thing2": "仅供参考，不构成诊断"}


def test_the_plan_without_adapt_keeps_its_content_hash() -> None:
    document = copy.deepcopy(BASE)
    del document["adapt"]
    del document["message"]["extra"]
    stored = Plan.model_validate(document)
    # a plan from before `adapt` hashes as before (its stored version stays current)
    assert content_hash(stored) == "7c50e7fab42e2dd2"
    assert Plan.model_validate(stored.model_dump(mode="json")) == stored
    assert content_hash(stored) != content_hash(plan())
    assert Plan.model_validate(plan().model_dump(mode="json")) == plan()  # stored by alias


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        (
            {"adapt": [{"if": {"inactive_for": "7 days"}, "send": "nudge"}]},
            "adapt.0.send",
            "no extra step 'nudge' under message.extra (there: encouragement)",
        ),
        ({"adapt": [{"if": {"inactive_for": "7 days"}}]}, "adapt.0", "give what the rule does"),
        ({"adapt": [{"if": {}, "skip": True}]}, "adapt.0.if", "give inactive_for, active_within"),
        (
            {"adapt": [{"if": {"inactive_for": "1 month"}, "skip": True}]},
            "adapt.0.if.inactive_for",
            "a month has no fixed length",
        ),
        (
            {"adapt": [{"if": {"idle_for": "7 days"}, "skip": True}]},
            "adapt.0.if.idle_for",
            "unknown field",
        ),
        (
            {"adapt": [{"when": {"inactive_for": "7 days"}, "skip": True}]},
            "adapt.0.when",
            "unknown field",
        ),
        (
            {
                "message": {
                    "default": BASE["message"]["default"],
                    "extra": {"encouragement": {"thing9": "x"}},
                }
            },
            "message.extra.encouragement",
            "not template fields: thing9",
        ),
        (
            {
                "message": {
                    "default": BASE["message"]["default"],
                    "extra": {"encouragement": {"thing1": "{nobody}"}},
                }
            },
            "message.extra.encouragement.thing1",
            "unknown variable {nobody}",
        ),
    ],
)
def test_bad_rules_are_errors_naming_the_field(changes: dict, field: str, needle: str) -> None:
    found = problems(**changes)
    assert any(f == field and needle in reason for f, reason in found), found


def test_an_extra_steps_content_is_checked_like_any_message() -> None:
    bare = plan(
        message={
            "default": BASE["message"]["default"],
            "extra": {"encouragement": {"thing2": "坚持就是胜利"}},  # drops the disclaimer
        }
    )
    found = static_violations(bare, DEFAULT_POLICY, NOW)
    assert [(v.rule, v.detail.endswith("(extra step encouragement)")) for v in found] == [
        ("disclaimer", True)
    ]
    assert static_violations(plan(), DEFAULT_POLICY, NOW) == []


def test_preview_says_the_rules_depend_on_activity_and_shows_the_extra_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    path = tmp_path / "rehab.yaml"
    path.write_text(yaml.safe_dump(BASE, allow_unicode=True), encoding="utf-8")
    code = main(["preview", str(path), "--from", "2026-12-01T10:00+08:00", "--count", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "rehab has adapt rules, which depend on each user's opens and activity" in out
    assert "adapt.0 (inactive_for 7 days: send encouragement)" in out
    assert "extra encouragement" in out
    assert "variable {patient} has no value for this user (pass it with --var)" in out
    assert main(["preview", str(path), "--count", "1", "--var", "patient=张三", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapt"]["extra_steps"] == [
        {
            "name": "encouragement",
            "message": {"thing1": "张三，坚持就是胜利", "thing2": "仅供参考，不构成诊断"},
        }
    ]


def test_a_calendar_plan_may_adapt_too() -> None:
    weekly = plan(schedule={"calendar": {"weekly": {"days": "mon", "at": "09:00"}}})
    assert weekly.adapt == plan().adapt
