"""Content variants: the plan-file syntax and its errors (file, field, why), the stable weighted
assignment (scheduler/domain/variants.py), rendering and validating every variant, the Wilson
interval of a variant's rates, and `preview` showing a user's variant."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from scheduler.cli import main
from scheduler.domain.engagement import Figures, wilson
from scheduler.domain.messages import render, variant_for
from scheduler.domain.variants import bucket, choose
from scheduler.errors import PlanError
from scheduler.planfiles import content_hash, parse_plan

BASE: dict[str, Any] = {
    "id": "tips",
    "name": "Tips",
    "category": "education",
    "consent": "long_term",
    "schedule": {"relative": {"every": "1 day", "count": 5, "at": "19:00"}},
    "template": {"id": "t", "fields": {"thing1": "thing", "thing2": "thing"}},
    "message": {
        "default": {"thing1": "第{step}天", "thing2": "今天的练习"},
        "variants": {
            "warm": {"weight": 1, "fields": {"thing2": "慢慢来"}},
            "plain": {"weight": 1},
        },
        "steps": {
            3: {
                "thing1": "第三天",
                "variants": {
                    "gentle": {"weight": 2, "fields": {"thing2": "休息一下也好"}},
                    "direct": {"weight": 1, "fields": {"thing2": "马上练习"}},
                },
            },
            4: {"thing2": "第四天的练习"},
        },
    },
}


def plan_text(change: Any = None) -> str:
    plan = copy.deepcopy(BASE)
    if change is not None:
        change(plan)
    return yaml.safe_dump(plan, allow_unicode=True)


def problems(change: Any) -> list[str]:
    with pytest.raises(PlanError) as caught:
        parse_plan(plan_text(change), "plans/tips.yaml")
    return [str(p) for p in caught.value.problems]


# --- the syntax -------------------------------------------------------------------------------


def test_a_step_and_the_whole_message_have_variants_over_their_texts() -> None:
    plan = parse_plan(plan_text(), "plans/tips.yaml")
    assert plan.message.variants_of(3) is not None and plan.message.variants_of(3)[0] == "3"
    assert plan.message.variants_of(4)[0] == "default"  # no variants of its own: the message's
    assert plan.message.texts(3, "direct") == {"thing1": "第三天", "thing2": "马上练习"}
    assert plan.message.texts(4, "warm") == {"thing1": "第{step}天", "thing2": "慢慢来"}
    assert plan.message.texts(4, "plain") == {"thing1": "第{step}天", "thing2": "第四天的练习"}
    with pytest.raises(KeyError):
        plan.message.texts(3, "warm")  # step 3's own variants replace the message's


def test_a_plan_dumps_as_written_and_one_without_variants_keeps_its_content_hash() -> None:
    plan = parse_plan(plan_text(), "plans/tips.yaml")
    dumped = plan.model_dump(mode="json")["message"]
    assert dumped["steps"]["3"]["variants"]["gentle"] == {
        "weight": 2,
        "fields": {"thing2": "休息一下也好"},
    }
    assert dumped["steps"]["4"] == {"thing2": "第四天的练习"}
    assert parse_plan(yaml.safe_dump(plan.model_dump(mode="json")), "again.yaml") == plan

    def plain(p: dict) -> None:
        del p["message"]["variants"]
        del p["message"]["steps"][3]["variants"]

    without = parse_plan(plan_text(plain), "plans/tips.yaml")
    assert "variants" not in without.model_dump(mode="json")["message"]
    # the hash of this plan as it was stored before variants existed (steps of plain texts)
    assert content_hash(without) == "415f11879ecccae0"


BAD = [
    (
        "zero-weight",
        lambda p: p["message"]["steps"][3]["variants"]["gentle"].update(weight=0),
        "plans/tips.yaml: message.steps.3.variants.gentle.weight: ",
        "greater than or equal to 1",
    ),
    (
        "fractional-weight",
        lambda p: p["message"]["variants"]["warm"].update(weight=1.5),
        "plans/tips.yaml: message.variants.warm.weight: ",
        "valid integer",
    ),
    (
        "text-weight",
        lambda p: p["message"]["variants"]["warm"].update(weight="2"),
        "plans/tips.yaml: message.variants.warm.weight: ",
        "valid integer",
    ),
    (
        "bad-name",
        lambda p: p["message"]["variants"].update({"Warm Tone": {"weight": 1}}),
        "plans/tips.yaml: message.variants: ",
        "'Warm Tone' is not a variant name: use 1-32 lowercase letters",
    ),
    (
        "default-name",
        lambda p: p["message"]["variants"].update({"default": {"weight": 1}}),
        "plans/tips.yaml: message.variants: ",
        "'default' is what reports call a message without variants",
    ),
    (
        "too-many",
        lambda p: p["message"].update(variants={f"v{i}": {"weight": 1} for i in range(11)}),
        "plans/tips.yaml: message.variants: ",
        "give 1 to 10 variants (found 11)",
    ),
    (
        "none",
        lambda p: p["message"].update(variants={}),
        "plans/tips.yaml: message.variants: ",
        "give 1 to 10 variants (found 0)",
    ),
    (
        "not-a-field",
        lambda p: p["message"]["steps"][3]["variants"]["gentle"]["fields"].update(thing9="x"),
        "plans/tips.yaml: message.steps.3.variants.gentle.fields: ",
        "not template fields: thing9",
    ),
    (
        "unknown-variable",
        lambda p: p["message"]["variants"]["warm"]["fields"].update(thing1="{nickname}"),
        "plans/tips.yaml: message.variants.warm.fields.thing1: ",
        "unknown variable {nickname}",
    ),
    (
        "unknown-key",
        lambda p: p["message"]["variants"]["warm"].update(text="x"),
        "plans/tips.yaml: message.variants.warm.text: ",
        "unknown field",
    ),
    (
        "step-text-too-long",
        lambda p: p["message"]["steps"][3].update(thing1="x" * 1001),
        "plans/tips.yaml: message.steps.3.thing1: ",
        "at most 1000 characters",
    ),
]


@pytest.mark.parametrize(("change", "where", "why"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_variant_is_an_error_naming_the_file_field_and_why(
    change: Any, where: str, why: str
) -> None:
    found = problems(change)
    assert any(p.startswith(where) and why in p for p in found), found


def test_validate_checks_every_variant_against_the_rules(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A variant's text is a message some users get: too long, it is rejected at its own path."""

    def sparse(p: dict) -> None:
        # `validate` samples the plan as one user enrolled today: five daily sends met the
        # education cap (3 a week) on the days when four of them fell in one ISO week.
        p["schedule"]["relative"]["every"] = "3 days"

    def long(p: dict) -> None:
        sparse(p)
        p["message"]["steps"][3]["variants"]["direct"]["fields"]["thing2"] = "很长" * 11

    (tmp_path / "tips.yaml").write_text(plan_text(long), encoding="utf-8")
    assert main(["validate", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        f"error  {tmp_path / 'tips.yaml'}: message.steps.3.variants.direct.fields.thing2: "
        "thing2: thing allows at most 20 characters, got 22 (step 3, variant direct)"
    ) in out, out
    (tmp_path / "tips.yaml").write_text(plan_text(sparse), encoding="utf-8")
    assert main(["validate", str(tmp_path)]) == 0


# --- the assignment ---------------------------------------------------------------------------


def test_the_assignment_is_pinned_and_the_same_in_another_process() -> None:
    """SHA-256, not Python's salted hash(): a restart, another replica or another Python gets
    the same variant. These values are part of the contract: changing them reshuffles users."""
    weights = {"gentle": 2, "direct": 1}
    users = [f"o-{i}" for i in range(200)]
    here = [choose(weights, "tips", "3", u) for u in users]
    assert bucket("tips", "3", "o-0", 3) == 0 and bucket("tips", "default", "o-0", 1000) == 228
    assert here[:6] == ["direct", "gentle", "gentle", "direct", "gentle", "direct"]
    code = (
        "import json, sys; from scheduler.domain.variants import choose; "
        "print(json.dumps([choose({'gentle': 2, 'direct': 1}, 'tips', '3', f'o-{i}') "
        "for i in range(200)]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert json.loads(there.stdout) == here


def test_the_order_variants_are_written_in_does_not_matter() -> None:
    a = {"gentle": 2, "direct": 1, "firm": 3}
    b = dict(reversed(a.items()))
    assert all(choose(a, "p", "1", f"u{i}") == choose(b, "p", "1", f"u{i}") for i in range(500))


@pytest.mark.parametrize(
    "weights", [{"gentle": 2, "direct": 1}, {"a": 1, "b": 1, "c": 1, "d": 7}, {"x": 999, "y": 1}]
)
def test_10000_users_split_within_2_points_of_the_weights(weights: dict[str, int]) -> None:
    got = Counter(choose(weights, "rehab-weekly", "3", f"oUser{i:05d}") for i in range(10_000))
    whole = sum(weights.values())
    for name, weight in weights.items():
        assert abs(got[name] / 10_000 - weight / whole) < 0.02, (name, got)


def test_a_step_and_the_whole_message_assign_independently_and_per_plan() -> None:
    plan = parse_plan(plan_text(), "plans/tips.yaml")
    users = [f"o-{i}" for i in range(400)]
    # the message-wide variants: one per user, at every step without its own
    assert all(variant_for(plan, 1, u) == variant_for(plan, 5, u) for u in users)
    assert {variant_for(plan, 3, u) for u in users} == {"gentle", "direct"}
    other = plan.model_copy(update={"id": "tips-2"})
    assert [variant_for(plan, 3, u) for u in users] != [variant_for(other, 3, u) for u in users]
    assert variant_for(parse_plan(yaml.safe_dump(_plain()), "p.yaml"), 3, "o-1") is None


def _plain() -> dict:
    plan = copy.deepcopy(BASE)
    del plan["message"]["variants"]
    del plan["message"]["steps"][3]["variants"]
    return plan


def test_render_writes_the_variants_text() -> None:
    plan = parse_plan(plan_text(), "plans/tips.yaml")
    due, tz = datetime(2026, 3, 4, 11, tzinfo=UTC), ZoneInfo("Asia/Shanghai")
    assert render(plan, 3, due, tz, "o-1", {}, "gentle") == {
        "thing1": "第三天",
        "thing2": "休息一下也好",
    }
    assert render(plan, 2, due, tz, "o-1", {}, "warm") == {"thing1": "第2天", "thing2": "慢慢来"}


def test_preview_shows_which_variant_a_user_gets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tips.yaml"
    path.write_text(plan_text(), encoding="utf-8")
    plan = parse_plan(plan_text(), str(path))
    argv = ["preview", str(path), "--from", "2026-12-01T10:00+08:00", "--count", "3"]
    assert main([*argv, "--user", "oABC", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["occurrences"]
    assert [r["variant"] for r in rows] == [variant_for(plan, s, "oABC") for s in (1, 2, 3)]
    assert main([*argv, "--user", "oABC"]) == 0
    out = capsys.readouterr().out
    assert f"[variant {variant_for(plan, 3, 'oABC')}]" in out


# --- the Wilson interval ----------------------------------------------------------------------

# Newcombe (1998), "Two-sided confidence intervals for the single proportion", Table I, method 3
# (the Wilson score interval), and the closed forms at 0 and n: z^2 / (n + z^2) = 0.2775 for n=10.
KNOWN = [
    (81, 263, (0.2553, 0.3662)),
    (15, 148, (0.0624, 0.1605)),
    (0, 20, (0.0, 0.1611)),
    (1, 29, (0.0061, 0.1718)),
    (0, 10, (0.0, 0.2775)),
    (10, 10, (0.7225, 1.0)),
]


@pytest.mark.parametrize(("part", "whole", "expected"), KNOWN)
def test_the_wilson_interval_matches_published_values(
    part: int, whole: int, expected: tuple[float, float]
) -> None:
    assert wilson(part, whole) == expected


def test_the_wilson_interval_has_none_without_sends_and_refuses_a_part_over_the_whole() -> None:
    assert wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(3, 2)
    narrow, wide = wilson(50, 1000), wilson(5, 100)
    assert narrow is not None and wide is not None and wide[0] < narrow[0] < narrow[1] < wide[1]
    assert Figures(sent=8, opened=0, cancelled=2).intervals() == {
        "click_through_ci": [0.0, 0.3244],
        "cancellation_rate_ci": [0.0715, 0.5907],
    }


# --- the guard names the variant ----------------------------------------------------------------


def test_the_guards_pause_reason_names_the_variant_with_the_most_cancellations() -> None:
    from scheduler.domain.engagement import GuardFigures, judge, pause_reason
    from scheduler.domain.policy import DEFAULT_POLICY

    guard = DEFAULT_POLICY.guard_for("tips")
    rows = [
        {"recent": False, "plan_version": 1, "step": 2, "variant": "default", "sent": 600,
         "cancelled": 3},
        {"recent": True, "plan_version": 1, "step": 3, "variant": "direct", "sent": 100,
         "cancelled": 30},
        {"recent": True, "plan_version": 1, "step": 3, "variant": "gentle", "sent": 200,
         "cancelled": 4},
    ]  # fmt: skip
    observed = GuardFigures.from_rows(rows)
    worst = observed.worst_step()
    assert worst is not None and (worst.step, worst.figures.sent, worst.figures.cancelled) == (
        3,
        300,
        34,
    )
    reason = pause_reason(judge(observed, guard), observed, guard)
    assert (
        "most after step 3 (version 1): 34 of 300 (11.3 %), most of them in variant direct: "
        "30 of 100 (30.0 %). Check the content" in reason
    ), reason
    # a step without variants reads as before
    plain = GuardFigures.from_rows([{**r, "variant": "default"} for r in rows[:2]])
    assert "variant" not in pause_reason(judge(plain, guard), plain, guard)
