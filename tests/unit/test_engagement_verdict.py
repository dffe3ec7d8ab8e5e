"""The engagement guard's pure side (docs/engagement.md, "The guard"): the verdict at each of its
boundaries (minimum sends, the limit, the spike's factor and margin, the baseline's minimum), the
reason text, the click-through flag, and the thresholds in the policy with per-plan overrides."""

from __future__ import annotations

import pytest

from scheduler.domain.engagement import (
    Figures,
    GuardFigures,
    Line,
    StepFigures,
    flag_steps,
    judge,
    low_click_through,
    pause_reason,
    thresholds_text,
)
from scheduler.domain.policy import DEFAULT_POLICY, Guard
from scheduler.errors import PlanError
from scheduler.planfiles import parse_policy

GUARD = DEFAULT_POLICY.engagement.guard  # limit 5 %, spike 3x and +2 points, 200 sends


def seen(sent: int, cancelled: int, base_sent: int = 0, base_cancelled: int = 0) -> GuardFigures:
    return GuardFigures(
        recent=Figures(sent=sent, cancelled=cancelled),
        baseline=Figures(sent=base_sent, cancelled=base_cancelled),
    )


def test_the_defaults_are_documented_ones() -> None:
    assert (
        str(GUARD.recent_window),
        str(GUARD.baseline_window),
        GUARD.min_sends,
        GUARD.max_cancellation_rate,
        GUARD.spike_factor,
        GUARD.spike_margin,
        GUARD.baseline_min_sends,
        GUARD.min_click_through,
        GUARD.click_through_min_sends,
        GUARD.auto_pause,
    ) == ("24 hours", "7 days", 200, 0.05, 3.0, 0.02, 200, 0.05, 100, True)


@pytest.mark.parametrize(
    ("figures", "rule"),
    [
        (seen(200, 11), "limit"),  # 5.5 % of 200: over the limit
        (seen(200, 10), None),  # exactly 5 %: not over it
        (seen(199, 50), None),  # 25 % but under the minimum sends
        (seen(0, 0), None),
        # spike: 3x the baseline and +2 points
        (seen(1000, 30, 1000, 10), "spike"),  # 3.0 % vs 1.0 %: 3x and +2.0 exactly
        (seen(1000, 29, 1000, 10), None),  # 2.9 %: under 3x and +1.9
        (seen(1000, 45, 1000, 20), None),  # 4.5 % vs 2.0 %: +2.5 but 2.25x
        (seen(1000, 15, 1000, 1), None),  # 1.5 % vs 0.1 %: 15x but only +1.4 points
        (seen(1000, 40, 199, 0), None),  # a 199-send baseline is no baseline
        (seen(1000, 40, 200, 0), "spike"),  # ... 200 is: 4 % vs 0 %
        (seen(1000, 51, 0, 0), "limit"),  # no baseline: the limit still applies
        (seen(1000, 60, 1000, 30), "limit"),  # both: the limit is named
    ],
)
def test_verdict_at_the_boundaries(figures: GuardFigures, rule: str | None) -> None:
    assert judge(figures, GUARD).rule == rule


def test_a_spike_is_above_the_baseline_even_without_a_margin() -> None:
    no_margin = Guard(spike_margin=0, min_sends=10, baseline_min_sends=10)
    assert judge(seen(100, 0, 100, 0), no_margin).rule is None  # 0 % is no spike of 0 %
    assert judge(seen(100, 1, 100, 0), no_margin).rule == "spike"
    assert judge(seen(100, 3, 100, 1), no_margin).rule == "spike"  # 3x exactly
    assert judge(seen(100, 2, 100, 1), no_margin).rule is None


def test_the_verdict_says_why_it_does_not_judge() -> None:
    few = judge(seen(150, 40), GUARD)
    assert few.note == "not judged under 200 sends"
    assert few.figures == (
        "cancellations 26.7 % of 150 sends in 24 hours, no baseline (0 sends in the 7 days before)"
    )
    no_base = judge(seen(300, 9, 100, 0), GUARD)
    assert not no_base.pause and "baseline under 200 sends" in (no_base.note or "")
    assert judge(seen(0, 0), GUARD).figures == "no sends in 24 hours"


def test_the_pause_reason_has_the_figures_the_rule_and_the_step() -> None:
    observed = GuardFigures(
        recent=Figures(sent=1000, cancelled=72),
        baseline=Figures(sent=6000, cancelled=48),
        steps=(
            StepFigures(version=1, step=2, figures=Figures(sent=500, cancelled=5)),
            StepFigures(version=1, step=3, figures=Figures(sent=500, cancelled=67)),
        ),
    )
    verdict = judge(observed, GUARD)
    assert verdict.rule == "limit"
    assert pause_reason(verdict, observed, GUARD) == (
        "engagement guard: cancellations 7.2 % of 1,000 sends in 24 hours, baseline 0.8 % of "
        "6,000 sends in the 7 days before: over the 5.0 % limit; most after step 3 (version 1): "
        "67 of 500 (13.4 %). Check the content, then resume the plan"
    )
    spike = seen(1000, 40, 6000, 48)
    assert "a spike (at least 3x the baseline and +2.0 %)" in pause_reason(
        judge(spike, GUARD), spike, GUARD
    )


def test_the_figures_come_from_the_stores_rows_per_window_and_step() -> None:
    rows = [
        {"recent": False, "plan_version": 1, "step": 1, "sent": 300, "cancelled": 3},
        {"recent": False, "plan_version": 1, "step": 2, "sent": 290, "cancelled": 2},
        {"recent": True, "plan_version": 1, "step": 3, "sent": 150, "cancelled": 4},
        {"recent": True, "plan_version": 2, "step": 3, "sent": 130, "cancelled": 9},
    ]
    observed = GuardFigures.from_rows(rows)
    assert (observed.recent.sent, observed.recent.cancelled) == (280, 13)
    assert (observed.baseline.sent, observed.baseline.cancelled) == (590, 5)
    worst = observed.worst_step()
    assert worst is not None and (worst.version, worst.step) == (2, 3)
    assert GuardFigures.from_rows([]).worst_step() is None
    assert GUARD.with_override(None) is GUARD


def test_the_click_through_floor() -> None:
    assert low_click_through(Figures(sent=100, opened=4), GUARD)
    assert not low_click_through(Figures(sent=100, opened=5), GUARD)  # exactly 5 %
    assert not low_click_through(Figures(sent=99, opened=0), GUARD)  # too few sends
    off = Guard(min_click_through=0)
    assert not low_click_through(Figures(sent=1000, opened=0), off)
    lines = [
        Line({"version": 1, "step": 1}, Figures(sent=200, opened=40)),
        Line({"version": 1, "step": 2}, Figures(sent=200, opened=2)),
    ]
    assert [line.low_click_through for line in flag_steps(lines, GUARD)] == [False, True]
    # No open at all: opens are not reported, nothing is flagged.
    unmeasured = [Line(line.key, Figures(sent=200)) for line in lines]
    assert [line.low_click_through for line in flag_steps(unmeasured, GUARD)] == [False, False]


def test_thresholds_and_per_plan_overrides_from_the_policy_file() -> None:
    policy = parse_policy(
        """
engagement:
  max_cancellation_rate: 4%
  spike_factor: 2.5
  min_sends: 500
exceptions:
  pilot:
    reason: a 40-user pilot
    engagement: {min_sends: 30, max_cancellation_rate: 0.1, recent_window: 2 days}
""",
        "policy.yaml",
    )
    general, pilot = policy.guard_for("other"), policy.guard_for("pilot")
    assert (general.max_cancellation_rate, general.spike_factor, general.min_sends) == (
        0.04,
        2.5,
        500,
    )
    assert (pilot.max_cancellation_rate, pilot.spike_factor, pilot.min_sends) == (0.1, 2.5, 30)
    assert str(pilot.recent_window) == "2 days"
    assert thresholds_text(pilot) == (
        "pauses over 10.0 %, or at 2.5x the baseline and +2.0 %, from 30 sends"
    )
    assert thresholds_text(Guard(auto_pause=False)) == "automatic pause off"


@pytest.mark.parametrize(
    ("text", "field", "phrase"),
    [
        ("engagement:\n  max_cancellation_rate: 1.5\n", "max_cancellation_rate", "less than"),
        ("engagement:\n  spike_margin: '-1%'\n", "spike_margin", "greater than"),
        ("engagement:\n  min_click_through: lots\n", "min_click_through", "number"),
        ("engagement:\n  spike_factor: 0.5\n", "spike_factor", "greater than or equal to 1"),
        ("engagement:\n  min_sends: 0\n", "min_sends", "greater than or equal to 1"),
        ("engagement:\n  recent_window: 1 month\n", "engagement", "no fixed length"),
        ("engagement:\n  baseline_window: 0 days\n", "engagement", "zero window"),
        (
            "exceptions:\n  p:\n    reason: r\n    engagement: {min_sends: -3}\n",
            "exceptions.p.engagement.min_sends",
            "greater than or equal to 1",
        ),
        (
            "exceptions:\n  p:\n    reason: r\n    engagement: {spike: 2}\n",
            "exceptions.p.engagement.spike",
            "unknown field",
        ),
    ],
)
def test_invalid_thresholds_are_refused_naming_the_field(
    text: str, field: str, phrase: str
) -> None:
    with pytest.raises(PlanError) as caught:
        parse_policy(text, "policy.yaml")
    [problem, *_] = caught.value.problems
    assert field in problem.field and phrase in problem.reason, problem
