"""Plan files from disk: the examples load, and every broken file is named with its field and why.

Broken files are written to a temporary folder and read by the real loader (`load_plans`) and the
real CLI (`reminders validate`), so these tests also cover YAML parsing and error wording.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.cli import main
from scheduler.planfiles import load_plans

PLANS = Path(__file__).resolve().parents[2] / "plans"
# policy.yaml is the folder's policy, not a plan
EXAMPLES = sorted(p for p in PLANS.glob("*.yaml") if p.name != "policy.yaml")

# A small valid plan that the broken cases below each break in one way.
VALID: dict[str, Any] = {
    "id": "pension",
    "name": "Pension payment notice",
    "category": "government",
    "consent": "long_term",
    "variables": ["name"],
    "schedule": {
        "calendar": {"timezone": "Asia/Shanghai", "monthly": {"day": 5, "at": "09:00"}},
        "grace": "2 hours",
    },
    "template": {
        "id": "pension_tmpl",
        "fields": {"name1": "name", "thing2": "thing", "date3": "date"},
    },
    "message": {
        "default": {"name1": "{name}", "thing2": "养老金已发放", "date3": "{date}"},
    },
}

RELATIVE = {"every": "1 week", "count": 12, "at": "09:00"}


def edit(change: Callable[[dict[str, Any]], object]) -> str:
    """VALID, changed by `change`, as YAML text."""
    plan = copy.deepcopy(VALID)
    change(plan)
    return yaml.safe_dump(plan, allow_unicode=True, sort_keys=False)


def calendar(plan: dict[str, Any]) -> dict[str, Any]:
    return plan["schedule"]["calendar"]


def to_relative(plan: dict[str, Any], **rule: object) -> None:
    del plan["schedule"]["calendar"]
    plan["schedule"]["relative"] = rule


def to_cron(plan: dict[str, Any], expr: str) -> None:
    del calendar(plan)["monthly"]
    calendar(plan)["cron"] = expr


# (id, file text, field path, a phrase of the reason)
BROKEN: list[tuple[str, str, str, str]] = [
    (
        "invalid-yaml",
        "name: Pension\ncategory: government\n  consent: long_term\n",
        "line 3, column 10",
        "not valid YAML: mapping values are not allowed here",
    ),
    (
        "unclosed-bracket",
        "name: Pension\nvariables: [name\ncategory: government\n",
        "line 3, column 9",
        "not valid YAML",
    ),
    ("not-a-mapping", "- id: pension\n- name: Pension\n", "", "must be a mapping, got a list"),
    ("a-bare-string", "pension plan\n", "", "must be a mapping, got a str"),
    ("empty-file", "", "", "must be a mapping, got an empty file"),
    ("only-comments", "# to do\n", "", "got an empty file"),
    (
        "unknown-top-level-field",
        edit(lambda p: p.update(descripton="Paid on the 5th")),
        "descripton",
        "unknown field (check its spelling",
    ),
    (
        "unknown-nested-field",
        edit(lambda p: calendar(p).update(time_zone="Asia/Shanghai")),
        "schedule.calendar.time_zone",
        "unknown field",
    ),
    (
        "missing-category",
        edit(lambda p: p.pop("category")),
        "category",
        "required field is missing",
    ),
    ("bad-category", edit(lambda p: p.update(category="health")), "category", "'medical'"),
    (
        "bad-consent-kind",
        edit(lambda p: p.update(consent="forever")),
        "consent",
        "'one_time' or 'long_term'",
    ),
    (
        "unknown-time-zone",
        edit(lambda p: calendar(p).update(timezone="Asia/Beijing")),
        "schedule.calendar.timezone",
        "'Asia/Beijing' is not an IANA time zone",
    ),
    (
        "bad-at-time",
        edit(lambda p: calendar(p)["monthly"].update(at="25:00")),
        "schedule.calendar.monthly.at.0",
        "'25:00' is not a time of day",
    ),
    (
        "at-time-with-offset",
        edit(lambda p: calendar(p)["monthly"].update(at=["08:00", "09:00+08:00"])),
        "schedule.calendar.monthly.at.1",
        "is not a time of day",
    ),
    (
        "calendar-and-relative",
        edit(lambda p: p["schedule"].update(relative=RELATIVE)),
        "schedule",
        "exactly one of 'calendar' or 'relative'",
    ),
    (
        "neither-calendar-nor-relative",
        edit(lambda p: p["schedule"].pop("calendar")),
        "schedule",
        "exactly one of 'calendar' or 'relative'",
    ),
    (
        "two-calendar-rules",
        edit(lambda p: calendar(p).update(daily={"at": "08:00"})),
        "schedule.calendar",
        "exactly one of weekly, monthly, daily, weekdays, workdays, cron or every"
        " (found monthly, daily)",
    ),
    (
        "no-calendar-rule",
        edit(lambda p: calendar(p).pop("monthly")),
        "schedule.calendar",
        "exactly one of weekly, monthly",
    ),
    (
        "cron-four-fields",
        edit(lambda p: to_cron(p, "0 9 5 *")),
        "schedule.calendar.cron",
        "'0 9 5 *' is not a valid crontab (Wrong number of fields",
    ),
    (
        "cron-minute-61",
        edit(lambda p: to_cron(p, "61 9 5 * *")),
        "schedule.calendar.cron",
        "is not a valid crontab",
    ),
    (
        "calendar-every-in-days",
        edit(lambda p: (calendar(p).pop("monthly"), calendar(p).update(every="2 days"))),
        "schedule.calendar",
        "'every' takes seconds, minutes or hours",
    ),
    (
        "relative-without-count-or-duration",
        edit(lambda p: to_relative(p, every="1 week", at="09:00")),
        "schedule.relative",
        "needs a count or a duration",
    ),
    (
        "relative-at-with-hours",
        edit(lambda p: to_relative(p, every="2 hours", count=3, at="09:00")),
        "schedule.relative",
        "'at' needs 'every' in days, weeks or months",
    ),
    (
        "bad-duration",
        edit(lambda p: to_relative(p, every="weekly", count=3)),
        "schedule.relative.every",
        "'weekly' is not a duration",
    ),
    (
        "grace-in-months",
        edit(lambda p: p["schedule"].update(grace="1 month")),
        "schedule.grace",
        "a month has no fixed length",
    ),
    (
        "monthly-day-32",
        edit(lambda p: calendar(p)["monthly"].update(day=32)),
        "schedule.calendar.monthly.day",
        "day must be 1-31 or 'last'",
    ),
    (
        "template-key-type-mismatch",
        edit(lambda p: p["template"]["fields"].update(thing2="number")),
        "template.fields.thing2",
        "'thing2' cannot be of type 'number'",
    ),
    (
        "unknown-wechat-type",
        edit(lambda p: p["template"]["fields"].update(thing2="text")),
        "template.fields.thing2",
        "unknown WeChat type 'text'",
    ),
    (
        "default-lacks-template-field",
        edit(lambda p: p["message"]["default"].pop("date3")),
        "message.default",
        "missing template fields: date3",
    ),
    (
        "message-field-not-in-template",
        edit(lambda p: p["message"]["default"].update(thing9="extra")),
        "message.default",
        "not template fields: thing9",
    ),
    (
        "step-field-not-in-template",
        edit(lambda p: p["message"].update(steps={2: {"thing4": "x"}})),
        "message.steps.2",
        "not template fields: thing4",
    ),
    (
        "unknown-variable",
        edit(lambda p: p["message"]["default"].update(name1="{nmae}")),
        "message.default.name1",
        "unknown variable {nmae}; declare it under 'variables'",
    ),
    (
        "unknown-variable-in-step",
        edit(lambda p: p["message"].update(steps={3: {"thing2": "第{week}周"}})),
        "message.steps.3.thing2",
        "unknown variable {week}",
    ),
    (
        "unclosed-brace",
        edit(lambda p: p["message"]["default"].update(thing2="{step 期")),
        "message.default.thing2",
        "write {{ and }} for literal braces",
    ),
    (
        "stray-closing-brace",
        edit(lambda p: p["message"]["default"].update(thing2="第}期")),
        "message.default.thing2",
        "Single '}'",
    ),
    (
        "step-beyond-count",
        edit(lambda p: (calendar(p).update(count=12), p["message"].update(steps={13: {}}))),
        "message.steps.13",
        "no such step (steps run 1..12)",
    ),
    (
        "step-zero",
        edit(lambda p: p["message"].update(steps={0: {"thing2": "x"}})),
        "message.steps.0",
        "no such step (steps start at 1)",
    ),
    (
        "bad-plan-id",
        edit(lambda p: p.update(id="Pension Monthly")),
        "id",
        "use 1-64 lowercase letters, digits, '-' or '_'",
    ),
]


BROKEN_CASES = [pytest.param(*case[1:], id=case[0]) for case in BROKEN]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_plan_is_valid(path: Path) -> None:
    loaded, problems = load_plans([path])
    assert problems == []
    assert [item.plan.id for item in loaded] == [path.stem]


def test_the_plans_folder_loads_without_problems() -> None:
    loaded, problems = load_plans([PLANS])
    assert problems == []
    assert sorted(item.plan.id for item in loaded) == sorted(p.stem for p in EXAMPLES)
    assert len(EXAMPLES) >= 5


def test_the_valid_base_plan_is_valid(tmp_path: Path) -> None:
    # Guards the table: each broken case must fail for its own reason only.
    loaded, problems = load_plans([write(tmp_path, "pension.yaml", edit(lambda p: None))])
    assert problems == [] and loaded[0].plan.id == "pension"


@pytest.mark.parametrize(
    ("text", "field", "phrase"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_broken_plan_file_names_file_field_and_reason(
    tmp_path: Path, text: str, field: str, phrase: str
) -> None:
    path = write(tmp_path, "broken.yaml", text)
    loaded, problems = load_plans([tmp_path])
    assert loaded == []
    assert len(problems) == 1, problems
    problem = problems[0]
    assert (problem.file, problem.field) == (str(path), field)
    assert phrase in problem.reason


@pytest.mark.parametrize(
    ("text", "field", "phrase"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN]
)
def test_validate_reports_broken_file_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str, phrase: str
) -> None:
    path = write(tmp_path, "broken.yaml", text)
    assert main(["validate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    where = f"{path}: {field}" if field else str(path)
    assert out.startswith(f"error  {where}: ")
    assert phrase in out


def test_a_misspelt_required_field_is_reported_twice(tmp_path: Path) -> None:
    path = write(tmp_path, "pension.yaml", edit(lambda p: p.update(categroy=p.pop("category"))))
    _, problems = load_plans([path])
    assert sorted((p.field, p.reason) for p in problems) == [
        ("category", "required field is missing"),
        ("categroy", "unknown field (check its spelling and indentation; see docs/plans.md)"),
    ]


def test_duplicate_plan_ids_across_two_files(tmp_path: Path) -> None:
    first = write(tmp_path, "a-pension.yaml", edit(lambda p: None))
    second = write(tmp_path, "b-pension.yaml", edit(lambda p: p.update(name="Copy")))
    loaded, problems = load_plans([tmp_path])
    assert [item.path for item in loaded] == [first]
    assert len(problems) == 1
    assert (problems[0].file, problems[0].field) == (str(second), "id")
    assert f"plan id 'pension' is also used by {first}" in problems[0].reason


def test_missing_id_defaults_to_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "pension-2027.yaml", edit(lambda p: p.pop("id")))
    loaded, problems = load_plans([path])
    assert problems == []
    assert loaded[0].plan.id == "pension-2027"


def test_unquoted_time_read_by_yaml_as_a_number_is_still_a_time(tmp_path: Path) -> None:
    # YAML 1.1 reads an unquoted 19:30 as the sexagesimal number 1170.
    text = (
        edit(lambda p: None).replace("at: 09:00", "at: 19:30").replace("at: '09:00'", "at: 19:30")
    )
    assert "at: 19:30" in text
    loaded, problems = load_plans([write(tmp_path, "pension.yaml", text)])
    assert problems == []
    monthly = loaded[0].plan.schedule.calendar.monthly
    assert monthly is not None and [t.isoformat() for t in monthly.at] == ["19:30:00"]


def test_a_broken_file_does_not_hide_the_good_ones(tmp_path: Path) -> None:
    good = write(tmp_path, "pension.yaml", edit(lambda p: None))
    bad = write(tmp_path, "broken.yaml", "name: [\n")
    loaded, problems = load_plans([tmp_path])
    assert [item.path for item in loaded] == [good]
    assert [p.file for p in problems] == [str(bad)]


def test_formatting_only_edits_keep_the_content_hash(tmp_path: Path) -> None:
    plain = write(tmp_path, "a.yaml", edit(lambda p: None))
    (loaded_a,), _ = load_plans([plain])
    reformatted = "# a comment\n" + json.dumps(VALID, ensure_ascii=False, indent=4)
    (loaded_b,), _ = load_plans([write(tmp_path, "b.yaml", reformatted)])
    changed = write(tmp_path, "c.yaml", edit(lambda p: p.update(name="Renamed")))
    (loaded_c,), _ = load_plans([changed])
    assert loaded_a.content_hash == loaded_b.content_hash != loaded_c.content_hash


# --- the `validate` command -------------------------------------------------------------------


def test_validate_accepts_the_plans_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(PLANS)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    # The commute alert follows China's official working days: validate says so when the
    # calendar package does not know a year it runs into yet (the documented fallback applies).
    unknown_year = "does not know"
    for line in out.splitlines():
        assert line.startswith("ok ") or ("commute-line2" in line and unknown_year in line), line
    for path in EXAMPLES:
        assert f"ok     {path} ({path.stem})" in out


def test_validate_fails_on_a_folder_with_one_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "pension.yaml", edit(lambda p: None))
    bad = write(tmp_path, "rehab.yaml", edit(lambda p: p.update(consent="forever")))
    assert main(["validate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    assert f"error  {bad}: consent: Input should be 'one_time' or 'long_term'" in out


def test_validate_json_lists_valid_plans_and_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path, "pension.yaml", edit(lambda p: None))
    bad = write(tmp_path, "rehab.yaml", edit(lambda p: (p.update(id="rehab"), p.pop("category"))))
    assert main(["validate", "--json", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == ""
    report = json.loads(out)
    assert report == {
        "valid": [{"file": str(good), "id": "pension"}],
        "errors": [{"file": str(bad), "field": "category", "reason": "required field is missing"}],
    }


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda folder: folder / "missing.yaml", "no such file or folder"),
        (lambda folder: folder, "no plan files found"),
    ],
    ids=["missing-file", "empty-folder"],
)
def test_validate_fails_when_there_is_nothing_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], Path], phrase: str
) -> None:
    assert main(["validate", str(make(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert phrase in out and err == ""


def test_preview_of_a_broken_file_is_a_plain_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = write(tmp_path, "pension.yaml", edit(lambda p: calendar(p).update(timezone="Mars")))
    assert main(["preview", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"error  {bad}: schedule.calendar.timezone: 'Mars' is not an IANA")
    assert "Traceback" not in err
