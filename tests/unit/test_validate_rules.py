"""`reminders validate` and `preview` against the policy: the folder's policy.yaml, rejected
plans named by file, field and reason, and the steps a rule would stop."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.cli import main
from scheduler.planfiles import load_plans

PLANS = Path(__file__).resolve().parents[2] / "plans"

BASE: dict[str, Any] = {
    "name": "Rehab",
    "category": "medical",
    "consent": "one_time",
    "schedule": {
        "calendar": {"timezone": "Asia/Shanghai", "weekly": {"days": "mon", "at": "09:00"}}
    },
    "template": {"id": "t", "fields": {"thing1": "thing", "thing2": "thing"}},
    "message": {"default": {"thing1": "第{step}周康复训练", "thing2": "仅供参考，不构成诊断"}},
}


def write_plan(folder: Path, name: str = "rehab.yaml", **changes: Any) -> Path:
    plan = copy.deepcopy(BASE)
    plan.update(changes)
    path = folder / name
    path.write_text(yaml.safe_dump(plan, allow_unicode=True), encoding="utf-8")
    return path


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["validate", *args])
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


REJECTED = [
    (
        "long-term-commerce",
        {"category": "commerce", "consent": "long_term"},
        "consent",
        "commerce may not use long-term templates",
    ),
    (
        "daily-medical",
        {"schedule": {"calendar": {"daily": {"at": "09:00"}}}},
        "schedule",
        "over the cap of 2 medical messages per user per week",
    ),
    (
        "three-a-day",
        {"category": "government", "schedule": {"calendar": {"daily": {"at": ["09", "12", "15"]}}}},
        "schedule",
        "over the cap of 2 per user per day, all plans together",
    ),
    (
        "in-quiet-hours",
        {"schedule": {"calendar": {"weekly": {"days": "mon", "at": "23:00"}}}},
        "schedule",
        "sends at 23:00 (Asia/Shanghai), inside the medical quiet hours 22:00-08:00",
    ),
    (
        "no-disclaimer",
        {"message": {"default": {"thing1": "第{step}周", "thing2": "按时训练"}}},
        "message",
        "medical message lacks the disclaimer",
    ),
    (
        "too-long-in-a-step",
        {"message": {**BASE["message"], "steps": {2: {"thing1": "很长" * 11}}}},
        "message.steps.2.thing1",
        "thing1: thing allows at most 20 characters, got 22 (step 2)",
    ),
    (
        "looser-cap",
        {"delivery": {"caps": {"category_week": 3}}},
        "delivery.caps.category_week",
        "3 is looser than the policy's 2",
    ),
    (
        "finance-without-key",
        {
            "category": "finance",
            "consent": "long_term",
            "message": {"default": {"thing1": "a", "thing2": "b"}},
        },
        "delivery.limit_key",
        "name the key",
    ),
]


@pytest.mark.parametrize(
    ("changes", "field", "phrase"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_validate_rejects_what_the_policy_forbids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, field: str, phrase: str
) -> None:
    path = write_plan(tmp_path, **changes)
    code, out = validate(capsys, str(tmp_path))
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith(f"error  {path}: {field}: ")]
    assert any(phrase in line for line in lines), out


def test_the_base_plan_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_plan(tmp_path)
    assert validate(capsys, str(tmp_path)) == (0, f"ok     {path} (rehab)\n")


def test_a_policy_exception_lets_a_plan_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plan(tmp_path, delivery={"caps": {"category_week": 3}})
    (tmp_path / "policy.yaml").write_text(
        "exceptions:\n  rehab: {reason: 'twice-weekly physio', category_week: 3}\n",
        encoding="utf-8",
    )
    assert validate(capsys, str(tmp_path))[0] == 0


def test_an_invalid_policy_is_an_error_naming_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plan(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("caps:\n  user_day: two\n", encoding="utf-8")
    code, out = validate(capsys, str(tmp_path))
    assert code == 1
    assert out.startswith(f"error  {policy}: caps.user_day: Input should be a valid integer")


def test_an_exception_for_an_unknown_plan_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_plan(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("exceptions:\n  rehab-typo: {reason: r, user_day: 3}\n", encoding="utf-8")
    code, out = validate(capsys, str(tmp_path))
    assert code == 1
    assert f"error  {policy}: exceptions.rehab-typo: no plan with this id in {tmp_path}" in out


def test_policy_yaml_is_never_a_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_plan(tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("caps: {user_day: 1}\n", encoding="utf-8")
    loaded, problems = load_plans([tmp_path, policy])
    assert problems == [] and [i.plan.id for i in loaded] == ["rehab"]
    # named on its own, it is checked as the policy it is
    assert validate(capsys, str(policy)) == (0, f"ok     {policy} (policy)\n")


def test_validate_policy_option_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_plan(tmp_path)
    strict = tmp_path / "strict.yaml.txt"
    strict.write_text("caps:\n  category_week: {medical: 1}\n", encoding="utf-8")
    assert validate(capsys, "--policy", str(strict), str(path))[0] == 0
    (tmp_path / "other").mkdir()
    daily = write_plan(
        tmp_path / "other",
        schedule={"calendar": {"weekly": {"days": ["mon", "thu"], "at": "09:00"}}},
    )
    code, out = validate(capsys, "--json", "--policy", str(strict), str(daily))
    assert code == 1
    [error] = json.loads(out)["errors"]
    assert error["field"] == "schedule" and "over the cap of 1 medical" in error["reason"]


def test_the_example_plans_pass_with_the_committed_policy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = validate(capsys, str(PLANS))
    assert code == 0, out
    # and the built-in defaults alone (no policy file) pass them too
    assert validate(capsys, "--policy", "/dev/null", str(PLANS)) == (0, out)


# --- preview marks the steps a rule would stop ---------------------------------------------------


def test_preview_marks_capped_and_deferred_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_plan(
        tmp_path,
        schedule={"calendar": {"daily": {"at": "21:00"}}},
        delivery={"on_capped": "skip"},
    )
    assert main(["preview", str(path), "--from", "2026-03-02T00:00", "--count", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("  step   1  2026-03-02T21:00:00+08:00")
    assert out[2].startswith("  step   2")
    assert out[3].startswith("  step   3  2026-03-04T21:00:00+08:00")
    assert out[4].strip() == (
        "skipped: capped: at most 2 medical messages per user per week (2026-W10) reached"
    )
    assert main(["preview", str(path), "--from", "2026-03-02T00:00", "--count", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["occurrences"]
    assert [r["rule"] and r["rule"]["reason"] for r in rows] == [None, None, "capped"]


def test_preview_shows_a_quiet_hours_deferral(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_plan(tmp_path, schedule={"calendar": {"weekly": {"days": "mon", "at": "23:00"}}})
    assert main(["preview", str(path), "--from", "2026-03-02T00:00", "--count", "1", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)["occurrences"]
    assert row["rule"] == {
        "outcome": "deferred",
        "reason": "quiet_hours",
        "rule": "quiet_hours",
        "detail": "23:00 is inside the quiet hours 22:00-08:00 (Asia/Shanghai), which end at "
        "2026-03-03 08:00",
        "until": "2026-03-03T08:00:00+08:00",
    }
