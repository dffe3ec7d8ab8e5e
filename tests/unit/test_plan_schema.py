"""docs/plan.schema.json: generated from the plan model, current, and agreeing with the loader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from scheduler.cli import main
from scheduler.errors import PlanError
from scheduler.planfiles import parse_plan

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "docs" / "plan.schema.json"
EXAMPLES = sorted(p for p in (ROOT / "plans").glob("*.yaml") if p.name != "policy.yaml")
REGENERATE = ".venv/bin/python -m scheduler.cli schema > docs/plan.schema.json"


def generated_schema(capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["schema"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def as_an_editor_sees_it(text: str) -> Any:
    """The YAML document as JSON data, as an editor's schema check gets it: dates are text
    and mapping keys are strings (`steps: {8: ...}` has the key "8")."""
    return json.loads(json.dumps(yaml.safe_load(text), default=str))


def test_committed_schema_is_the_generated_one(capsys: pytest.CaptureFixture[str]) -> None:
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert committed == generated_schema(capsys), (
        f"docs/plan.schema.json is stale: regenerate it with `{REGENERATE}`"
    )


def test_schema_is_a_valid_json_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA_FILE.read_text("utf-8")))


@pytest.fixture(scope="module")
def validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text("utf-8")))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_plan_validates_against_the_schema(validator: Any, path: Path) -> None:
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(as_an_editor_sees_it(path.read_text("utf-8")))
    ]
    assert errors == []


BASE = """\
name: Lesson reminder
category: education
consent: long_term
schedule:
  calendar:
    weekly:
      days: [fri]
      at: "19:00"
template:
  id: lesson_tmpl
  fields: {thing1: thing}
message:
  default: {thing1: "第{step}课"}
"""

# (id, text change as (old, new), whether the loader accepts it): the schema must agree.
VARIANTS: list[tuple[str, tuple[str, str], bool]] = [
    ("as-is", ("", ""), True),
    ("at-as-a-list", ('at: "19:00"', 'at: ["08:00", "19:00:30"]'), True),
    ("days-as-one-day", ("days: [fri]", "days: fri"), True),
    ("with-id", ("name:", "id: lessons\nname:"), True),
    ("end-date", ("    weekly:", "    end: 2026-12-31\n    weekly:"), True),
    (
        "step-override",
        ('{thing1: "第{step}课"}', '{thing1: "x"}\n  steps: {2: {thing1: "y"}}'),
        True,
    ),
    (
        "relative",
        (
            '  calendar:\n    weekly:\n      days: [fri]\n      at: "19:00"\n',
            '  relative:\n    every: 1 week\n    count: 3\n    at: "19:00"\n',
        ),
        True,
    ),
    ("unknown-field", ("name:", "title: x\nname:"), False),
    ("missing-category", ("category: education\n", ""), False),
    ("bad-consent", ("long_term", "forever"), False),
    ("bad-weekday", ("[fri]", "[fry]"), False),
    ("bad-time", ('"19:00"', '"7pm"'), False),
    ("empty-at-list", ('"19:00"', "[]"), False),
    ("bad-grace", ("schedule:\n", "schedule:\n  grace: soon\n"), False),
    ("count-zero", ("    weekly:", "    count: 0\n    weekly:"), False),
]


@pytest.mark.parametrize(
    ("change", "loader_accepts"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_schema_agrees_with_the_loader(
    validator: Any, change: tuple[str, str], loader_accepts: bool
) -> None:
    old, new = change
    assert old in BASE
    text = BASE.replace(old, new, 1)
    try:
        parse_plan(text, "lessons.yaml")
    except PlanError:
        accepted = False
    else:
        accepted = True
    assert accepted == loader_accepts
    assert validator.is_valid(as_an_editor_sees_it(text)) == loader_accepts
