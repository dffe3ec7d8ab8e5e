"""Reading plan files from disk: YAML in, validated `Plan`s or plain-worded problems out."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from scheduler.domain.plan import Delivery, Plan
from scheduler.domain.policy import Policy
from scheduler.errors import PlanError, PlanProblem

PLAN_SUFFIXES = (".yaml", ".yml")
POLICY_FILE = "policy.yaml"  # reserved: the folder's policy, never a plan


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
        elif path.name != POLICY_FILE:
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


def _yaml(text: str, source: str) -> object:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc)
        raise PlanError([PlanProblem(source, where, f"not valid YAML: {reason}")]) from None


def parse_plan(text: str, source: str) -> Plan:
    """Validate one plan file's text; raises PlanError naming `source`, the field and why."""
    data = _yaml(text, source)
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
    data = plan.model_dump(mode="json")
    # Plans written before `delivery` existed keep their version (and their schedules).
    if plan.delivery == Delivery():
        del data["delivery"]
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False)
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


# --- the policy, and the rules `validate` checks against it ---------------------------------------


def parse_policy(text: str, source: str) -> Policy:
    """Validate a policy file's text (empty: the defaults); raises PlanError naming `source`."""
    data = _yaml(text, source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        reason = f"a policy file must be a mapping, got a {type(data).__name__}"
        raise PlanError([PlanProblem(source, "", reason)])
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PlanError([_problem(source, err) for err in exc.errors()]) from None


def load_policy(path: Path) -> Policy:
    """The policy in `path` (a policy file, or a plans folder's `policy.yaml`); the built-in
    defaults when there is no such file. Raises PlanError for an invalid one."""
    if path.is_dir():
        path = path / POLICY_FILE
    if not path.exists():
        return Policy()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError([PlanProblem(str(path), "", f"cannot read: {exc}")]) from None
    return parse_policy(text, str(path))


def policy_file_for(path: Path) -> Path:
    """Where the policy of a plan file or folder is: `policy.yaml` in the plans folder."""
    return (path if path.is_dir() else path.parent) / POLICY_FILE


@dataclass
class Checked:
    plans: list[LoadedPlan] = field(default_factory=list)  # valid, and within the policy
    problems: list[PlanProblem] = field(default_factory=list)
    policies: list[Path] = field(default_factory=list)  # policy files named and found valid


def check_plans(paths: Iterable[Path], now: datetime, policy_file: Path | None = None) -> Checked:
    """`reminders validate`: the plans under `paths`, checked against their folder's policy (or
    `policy_file`) for everything that does not depend on a user (`rules.static_violations`)."""
    from scheduler.domain.rules import static_violations

    paths = list(paths)
    checked = Checked()
    policies: dict[Path, Policy | None] = {}

    def policy_at(file: Path) -> Policy | None:
        if file not in policies:
            try:
                policies[file] = load_policy(file)
            except PlanError as exc:
                checked.problems.extend(exc.problems)
                policies[file] = None
        return policies[file]

    for path in paths:
        if path.name == POLICY_FILE and path.is_file() and policy_at(path) is not None:
            checked.policies.append(path)
    loaded, load_problems = load_plans(paths)
    checked.problems.extend(load_problems)
    for item in loaded:
        policy = policy_at(policy_file or policy_file_for(item.path))
        if policy is None:
            continue  # its problems are reported; the plan cannot be checked against it
        violations = static_violations(item.plan, policy, now)
        checked.problems.extend(
            PlanProblem(str(item.path), v.field or "", v.detail) for v in violations
        )
        if not violations:
            checked.plans.append(item)
    for folder in (p for p in paths if p.is_dir() and policy_file is None):
        policy = policy_at(folder / POLICY_FILE)
        ids = {item.plan.id for item in loaded if item.path.parent == folder}
        for plan_id in sorted(set(policy.exceptions if policy else ()) - ids):
            reason = f"no plan with this id in {folder}"
            checked.problems.append(
                PlanProblem(str(folder / POLICY_FILE), f"exceptions.{plan_id}", reason)
            )
    return checked
