"""Reading plan files from disk: YAML in, validated `Plan`s or plain-worded problems out."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from scheduler.domain.plan import Plan
from scheduler.errors import PlanError, PlanProblem

PLAN_SUFFIXES = (".yaml", ".yml")
POLICY_FILE = "policy.yaml"  # reserved: not a plan


@dataclass(frozen=True)
class LoadedPlan:
    plan: Plan
    path: Path
    content_hash: str  # of the validated plan, so formatting-only edits are not new versions


def plan_files(paths: Iterable[Path]) -> list[Path]:
    """The plan files named by `paths` (files as given, folders searched one level deep)."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if p.suffix in PLAN_SUFFIXES
                    and p.is_file()
                    and p.name != POLICY_FILE
                    and not p.name.startswith(".")
                )
            )
        else:
            found.append(path)
    return found


def _field_path(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the model-validator's own tag in loc for unions; drop the noise
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts)


def _message(error: dict) -> str:
    msg = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if error["type"] == "extra_forbidden":
        return "unknown field (check its spelling and indentation; see docs/plans.md)"
    if error["type"] == "missing":
        return "required field is missing"
    return msg


# Validators that check several fields together start their message with the field at fault,
# relative to where they sit ("message.steps.4: no such step"): move it into the field path.
_LEADING_FIELD = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*): (.+)$", re.DOTALL)


def _problem(source: str, error: dict) -> PlanProblem:
    field, reason = _field_path(error["loc"]), _message(error)
    if error["type"] == "value_error" and (match := _LEADING_FIELD.match(reason)):
        field = f"{field}.{match[1]}" if field else match[1]
        reason = match[2]
    return PlanProblem(source, field, reason)


def parse_plan(text: str, source: str) -> Plan:
    """Validate one plan file's text; raises PlanError naming `source`, the field and why."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise PlanError([PlanProblem(source, where, f"not valid YAML: {reason}")]) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise PlanError([PlanProblem(source, "", f"a plan file must be a mapping, got {got}")])
    if "id" not in data:
        data["id"] = Path(source).stem
    try:
        return Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError([_problem(source, err) for err in exc.errors()]) from None


def content_hash(plan: Plan) -> str:
    canonical = json.dumps(plan.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_plan_file(path: Path) -> LoadedPlan:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError([PlanProblem(str(path), "", f"cannot read: {exc}")]) from None
    plan = parse_plan(text, str(path))
    return LoadedPlan(plan, path, content_hash(plan))


def load_plans(paths: Iterable[Path]) -> tuple[list[LoadedPlan], list[PlanProblem]]:
    """Every valid plan under `paths`, and the problems of the invalid ones (and duplicate ids)."""
    loaded: list[LoadedPlan] = []
    problems: list[PlanProblem] = []
    seen: dict[str, Path] = {}
    for path in plan_files(paths):
        if not path.exists():
            problems.append(PlanProblem(str(path), "", "no such file or folder"))
            continue
        try:
            item = load_plan_file(path)
        except PlanError as exc:
            problems.extend(exc.problems)
            continue
        if item.plan.id in seen:
            problems.append(
                PlanProblem(
                    str(path),
                    "id",
                    f"plan id {item.plan.id!r} is also used by {seen[item.plan.id]}",
                )
            )
            continue
        seen[item.plan.id] = path
        loaded.append(item)
    return loaded, problems
