"""The policy file: built-in defaults, overrides from `plans/policy.yaml`, plain errors."""

from __future__ import annotations

from datetime import time
from pathlib import Path

import pytest

from scheduler.domain.plan import Category
from scheduler.domain.policy import DEFAULT_MEDICAL_DISCLAIMERS, Policy
from scheduler.errors import PlanError
from scheduler.planfiles import load_policy, parse_policy

PLANS = Path(__file__).resolve().parents[2] / "plans"


def test_defaults() -> None:
    policy = Policy()
    assert set(policy.long_term_categories) == {
        Category.GOVERNMENT,
        Category.MEDICAL,
        Category.TRANSPORT,
        Category.EDUCATION,
        Category.FINANCE,
    }
    assert str(policy.limited_long_term[Category.FINANCE]) == "1 per month"
    assert policy.caps.user_day == 2
    weekly = {c: policy.caps.category_week_for(c) for c in Category}
    assert weekly == {c: 2 if c == "medical" else 3 if c == "education" else 14 for c in Category}
    assert policy.caps.category_week_for(Category.EDUCATION) == 3
    assert str(policy.quiet_hours.window_for(Category.MEDICAL)) == "22:00-08:00"
    assert str(policy.quiet_hours.window_for(Category.TRANSPORT)) == "22:00-06:00"
    assert "优惠" in policy.content.all_promotional_words
    assert "sale" in policy.content.all_promotional_words
    assert policy.content.disclaimers[Category.MEDICAL] == list(DEFAULT_MEDICAL_DISCLAIMERS)
    assert "保本" in policy.content.forbidden_claims[Category.FINANCE]


def test_no_file_and_an_empty_file_mean_the_defaults(tmp_path: Path) -> None:
    assert load_policy(tmp_path) == Policy()
    (tmp_path / "policy.yaml").write_text("# nothing yet\n", encoding="utf-8")
    assert load_policy(tmp_path) == Policy()


def test_an_override_keeps_every_other_default() -> None:
    policy = parse_policy(
        """
caps:
  user_day: 1
  category_week: {education: 2}
quiet_hours:
  default: {start: "21:00", end: "09:00"}
content:
  extra_promotional_words: [会员日]
  disclaimers: {medical: [仅供参考]}
""",
        "policy.yaml",
    )
    assert policy.caps.user_day == 1
    # category mappings merge with the defaults, one category at a time
    assert policy.caps.category_week == {Category.MEDICAL: 2, Category.EDUCATION: 2}
    assert policy.quiet_hours.default.start == time(21)
    assert str(policy.quiet_hours.window_for(Category.TRANSPORT)) == "22:00-06:00"
    assert policy.content.all_promotional_words[-1] == "会员日"
    assert "优惠" in policy.content.all_promotional_words
    assert policy.content.disclaimers == {Category.MEDICAL: ["仅供参考"]}
    assert Category.FINANCE in policy.content.forbidden_claims


def test_null_drops_a_default_category_entry() -> None:
    policy = parse_policy("quiet_hours:\n  categories:\n    transport: null\n", "policy.yaml")
    assert str(policy.quiet_hours.window_for(Category.TRANSPORT)) == "22:00-08:00"


def test_the_committed_policy_loads_and_needs_no_exception() -> None:
    policy = load_policy(PLANS)
    assert policy.exceptions == {}
    assert policy.caps == Policy().caps


INVALID = [
    ("caps:\n  user_day: 0\n", "caps.user_day", "greater than or equal to 1"),
    ("caps:\n  user_dya: 1\n", "caps.user_dya", "unknown field"),
    ("long_term_categories: [shopping]\n", "long_term_categories.0", "'government'"),
    (
        "quiet_hours:\n  default: {start: '25:00', end: '08:00'}\n",
        "quiet_hours.default.start",
        "'25:00' is not a time of day",
    ),
    (
        "caps:\n  category_week: {health: 2}\n",
        "caps.category_week.health.[key]",
        "Input should be",
    ),
    (
        "exceptions:\n  practice-30days: {user_day: 3}\n",
        "exceptions.practice-30days.reason",
        "missing",
    ),
    (
        "long_term_categories: [government]\n",
        "limited_long_term.finance",
        "finance is not in long_term_categories",
    ),
    (
        "content:\n  extra_promotional_words: ['']\n",
        "content.extra_promotional_words",
        "empty word",
    ),
    ("- caps\n", "", "must be a mapping, got a list"),
    ("caps: [\n", "line 2, column 1", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "field", "phrase"), INVALID)
def test_invalid_policy_names_file_field_and_reason(text: str, field: str, phrase: str) -> None:
    with pytest.raises(PlanError) as caught:
        parse_policy(text, "plans/policy.yaml")
    [problem, *_] = caught.value.problems
    assert (problem.file, problem.field) == ("plans/policy.yaml", field)
    assert phrase in problem.reason
