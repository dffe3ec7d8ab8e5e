"""Hostile plan files (issue 9): each one is a plain error naming the file, where in it and why,
found in bounded time and memory; never a traceback, a hang or a runaway allocation.

Every case here once crashed or hung `reminders validate`; they run through the real loader and
the real CLI, as the files they are.
"""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scheduler.cli import main
from scheduler.domain import limits
from scheduler.domain.messages import RenderError, render
from scheduler.domain.plan import Message
from scheduler.domain.rules import static_violations
from scheduler.planfiles import load_plans, parse_plan, parse_policy

NOW = datetime(2026, 3, 1, tzinfo=UTC)

BASE = """\
id: lessons
name: Lesson reminder
category: education
consent: long_term
schedule:
  calendar:
    timezone: Asia/Shanghai
    weekly:
      days: [fri]
      at: "19:00"
    start: 2026-12-04
    count: 8
template:
  id: lesson_tmpl
  fields: {thing1: thing}
message:
  default: {thing1: "第{step}课"}
"""

RELATIVE = BASE.replace(
    '    weekly:\n      days: [fri]\n      at: "19:00"\n    start: 2026-12-04\n    count: 8\n',
    "    every: 1 hour\n",
).replace("  calendar:\n    timezone: Asia/Shanghai\n    every: 1 hour\n", "  relative: RULE\n")


def base(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def relative(rule: str) -> str:
    return RELATIVE.replace("RULE", rule)


def nested(depth: int) -> str:
    return "name: " + "[" * depth + "]" * depth + "\n"


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)

# (id, file text, field path (a regex: YAML errors name a line and column), a phrase of the reason)
HOSTILE: list[tuple[str, str, str, str]] = [
    # PyYAML resolves these scalars, then raises ValueError (not YAMLError) building them
    ("day-30-of-february", base("2026-12-04", "2026-02-30"), "line 11, column 12", "day is out"),
    ("hour-25", base("2026-12-04", "2026-12-04 25:00:00"), "line 11", "hour must be in 0..23"),
    ("year-0", base("2026-12-04", "0000-12-04"), "line 11", "year 0 is out of range"),
    ("bad-int-tag", base("count: 8", "count: !!int eight"), "line 12", "as !!int"),
    ("bad-timestamp-tag", base("2026-12-04", "!!timestamp soon"), "line 11", "as !!timestamp"),
    ("5000-digit-int", base("count: 8", "count: 1" + "0" * 5000), "line 12", "integer"),
    # structure
    ("nested-1000-deep", nested(1000), "line 1", "nested more than 32 levels"),
    ("nested-mappings", "name:" + "".join(f"\n{' ' * i}k:" for i in range(1, 60)), "line", "nest"),
    ("billion-laughs", BILLION_LAUGHS, "", "too large once its aliases are expanded"),
    ("alias-to-itself", "name: &a [*a]\n", "", "nested more than 32 levels"),
    # numbers the schedule maths cannot take
    ("count-10-to-the-9", base("count: 8", "count: 1000000000"), "schedule.calendar.count", "1000"),
    ("count-past-maxsize", base("count: 8", "count: " + "9" * 30), "schedule.calendar.count", ""),
    (
        "relative-duration-huge",
        relative("{every: 1 day, duration: 99999999999 days}"),
        "schedule.relative.duration",
        "at most 100 years",
    ),
    (
        "first-after-huge",
        relative("{every: 1 day, count: 3, first_after: 99999999999 months}"),
        "schedule.relative.first_after",
        "at most 100 years",
    ),
    (
        "calendar-every-huge",
        base('    weekly:\n      days: [fri]\n      at: "19:00"\n', "    every: 10000000 hours\n"),
        "schedule.calendar.every",
        "at most 100 years",
    ),
    (
        "grace-huge",
        base("schedule:\n", "schedule:\n  grace: 99999999999999999 seconds\n"),
        "schedule.grace",
        "at most 100 years",
    ),
    ("start-year-9999", base("2026-12-04", "9999-12-31"), "schedule.calendar.start", "2999"),
    (
        "cron-day-of-week-9",
        base('    weekly:\n      days: [fri]\n      at: "19:00"\n', '    cron: "0 9 * * 9"\n'),
        "schedule.calendar.cron",
        "not a valid crontab",
    ),
    (
        "time-zone-300-chars",
        base("Asia/Shanghai", "A" * 300),
        "schedule.calendar.timezone",
        "not an IANA time zone",
    ),
    ("time-zone-with-nul", base("Asia/Shanghai", '"Asia/\\0"'), "schedule.calendar.timezone", ""),
    ("at-100-times", base('at: "19:00"', f"at: [{', '.join(['19:00'] * 100)}]"), "", "24"),
    ("name-10000-chars", base("Lesson reminder", "x" * 10_000), "name", "1000 characters"),
    # text PostgreSQL cannot store (the daemon records every plan's definition)
    ("nul-in-text", base('"第{step}课"', '"第\\0课"'), "message.default.thing1", "NUL"),
    ("lone-surrogate", base("Lesson reminder", '"\\ud800"'), "name", "surrogate"),
    # message templates: only the placeholders and format specs a message needs
    ("huge-width", base("第{step}课", "{step:99999999d}"), "message.default.thing1", "width"),
    ("huge-precision", base("第{step}课", "{step:.99999f}"), "message.default.thing1", "precis"),
    ("nested-spec", base("第{step}课", "{step:{count}}"), "message.default.thing1", "spec"),
    ("conversion", base("第{step}课", "{step!r}"), "message.default.thing1", "!r"),
    ("attribute", base("第{step}课", "{step.real}"), "message.default.thing1", "step.real"),
]


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def test_the_base_plans_are_valid() -> None:
    assert static_violations(parse_plan(BASE, "lessons.yaml"), parse_policy("", "p"), NOW) == []
    parse_plan(relative("{every: 1 day, count: 3}"), "lessons.yaml")


@pytest.mark.parametrize(
    ("text", "field", "phrase"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE]
)
def test_hostile_file_is_one_plain_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, field: str, phrase: str
) -> None:
    path = write(tmp_path, "lessons.yaml", text)
    started = time.monotonic()
    loaded, problems = load_plans([tmp_path])
    assert time.monotonic() - started < 5
    assert loaded == [] and problems, problems
    problem = problems[0]
    assert problem.file == str(path)
    assert re.match(field, problem.field), problem
    assert phrase in problem.reason, problem
    assert "\n" not in str(problem)
    # and as `reminders validate` prints it
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"error  {path}: ") and phrase in out


def test_a_policy_file_gets_the_same_protection(tmp_path: Path) -> None:
    write(tmp_path, "lessons.yaml", BASE)
    policy = write(tmp_path, "policy.yaml", "caps: {user_day: !!int two}\n")
    assert main(["validate", str(tmp_path)]) == 1
    policy.write_text(nested(1000))
    _, problems = load_plans([tmp_path])  # the plans themselves are fine
    assert problems == []
    assert main(["validate", str(policy)]) == 1


def test_policy_caps_are_bounded() -> None:
    with pytest.raises(Exception, match="less than or equal"):
        parse_policy("caps: {user_day: 99999999999999999999}\n", "policy.yaml")


# --- counts are computed lazily -------------------------------------------------------------


def test_checking_a_plan_with_the_largest_count_is_quick() -> None:
    text = base(
        '    weekly:\n      days: [fri]\n      at: "19:00"\n', '    cron: "* * * * *"\n'
    ).replace("count: 8", f"count: {limits.MAX_COUNT}")
    plan = parse_plan(text, "lessons.yaml")
    started = time.monotonic()
    static_violations(
        plan, parse_policy("caps: {user_day: 10000, category_week_default: 10000}", "p"), NOW
    )
    assert time.monotonic() - started < 2


def test_a_schedule_past_the_end_of_the_calendar_just_ends() -> None:
    from scheduler.domain.schedule import calendar_anchor, calendar_trigger, relative_due

    every = base(
        '    weekly:\n      days: [fri]\n      at: "19:00"\n', "    every: 876000 hours\n"
    ).replace("count: 8", f"count: {limits.MAX_COUNT}")
    cal = parse_plan(every, "x.yaml").schedule.calendar
    assert cal is not None
    assert calendar_trigger(cal, calendar_anchor(cal, NOW), NOW) is not None
    rule = parse_plan(relative("{every: 1200 months, count: 1000}"), "x.yaml").schedule.relative
    assert rule is not None
    from zoneinfo import ZoneInfo

    assert relative_due(rule, NOW, ZoneInfo("Asia/Shanghai"), 999) is None


# --- rendering is safe even for a plan that was never validated ------------------------------


def test_render_refuses_a_huge_width_it_did_not_validate() -> None:
    plan = parse_plan(BASE, "lessons.yaml")
    # a plan stored before the format specs were checked
    plan = plan.model_copy(
        update={
            "message": Message.model_construct(default={"thing1": "{step:99999999d}"}, steps={})
        }
    )
    started = time.monotonic()
    with pytest.raises(RenderError, match="width"):
        render(plan, 1, NOW, UTC, "u", {})
    assert time.monotonic() - started < 0.1


def test_ordinary_format_specs_still_work() -> None:
    plan = parse_plan(base("第{step}课", "第{step:02d}/{count:>3}课"), "lessons.yaml")
    assert render(plan, 1, NOW, UTC, "u", {}) == {"thing1": "第01/  8课"}


# --- files that are not plain files are reported, not read ----------------------------------


def special_cases(folder: Path) -> dict[str, tuple[Path, str]]:
    fifo = folder / "fifo.yaml"
    os.mkfifo(fifo)
    loop = folder / "loop.yaml"
    loop.symlink_to(loop)
    dangling = folder / "gone.yaml"
    dangling.symlink_to(folder / "nowhere.yaml")
    (folder / "dir.yaml").mkdir()
    big = write(folder, "big.yaml", BASE + "#" * limits.MAX_FILE_BYTES)
    return {
        "fifo": (fifo, "not a regular file (a named pipe"),
        "loop": (loop, "symbolic link"),
        "dangling": (dangling, "symbolic link to a missing file"),
        "dir": (folder / "dir.yaml", "not a regular file (a folder"),
        "big": (big, "over the limit of"),
    }


def test_special_files_in_a_folder_are_reported_not_read(tmp_path: Path) -> None:
    good = write(tmp_path, "lessons.yaml", BASE)
    cases = special_cases(tmp_path)
    loaded, problems = load_plans([tmp_path])
    assert [item.path for item in loaded] == [good]
    found = {p.file: p.reason for p in problems}
    for path, phrase in cases.values():
        assert phrase in found[str(path)], found


@pytest.mark.timeout(20)
def test_special_files_named_explicitly_are_reported_not_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = special_cases(tmp_path)
    for path, phrase in [*cases.values(), (Path("/dev/zero"), "a character device")]:
        if path.name == "dir.yaml":
            continue  # a folder named on the command line is read as a plans folder
        assert main(["validate", str(path)]) == 1
        out, err = capsys.readouterr()
        assert err == "" and out.startswith(f"error  {path}: ") and phrase in out, out


def test_a_file_name_that_is_not_utf8_is_reported_printably(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, os.fsdecode(b"lat\xe9.yaml"), BASE)  # Latin-1
    assert main(["validate", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == f"error  {tmp_path}/lat\\xe9.yaml: the file name is not UTF-8 text: rename it\n"
