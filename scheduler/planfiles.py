"""Reading plan files from disk: YAML in, validated `Plan`s or plain-worded problems out."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import ValidationError

from scheduler.domain.limits import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES
from scheduler.domain.plan import Delivery, Plan
from scheduler.domain.policy import Policy
from scheduler.errors import PlanError, PlanProblem

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

log = logging.getLogger(__name__)
T = TypeVar("T")

PLAN_SUFFIXES = (".yaml", ".yml")
POLICY_FILE = "policy.yaml"  # reserved: the folder's policy, never a plan


@dataclass(frozen=True)
class LoadedPlan:
    plan: Plan
    path: Path
    content_hash: str  # of the validated plan, so formatting-only edits are not new versions


def plan_files(paths: Iterable[Path]) -> list[Path]:
    """The plan files named by `paths` (files as given, folders searched one level deep).

    A folder's entries are chosen by name only: one that is not a regular file (a folder, a FIFO,
    a symlink loop) is still listed, so that reading it reports what it is.
    """
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                sorted(
                    p
                    for p in path.iterdir()
                    if p.suffix in PLAN_SUFFIXES
                    and p.name != POLICY_FILE
                    and not p.name.startswith(".")
                )
            )
        elif path.name != POLICY_FILE:
            found.append(path)
    return found


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a named pipe",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _not_regular(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
    return f"not a regular file ({kind}): only plain files are read"


def _cannot_read(path: Path, reason: str) -> PlanError:
    return PlanError([PlanProblem(str(path), "", reason)])


def read_text(path: Path) -> str:
    """The text of a plan or policy file. Only a regular file of at most MAX_FILE_BYTES is read:
    anything else (a FIFO would block, /dev/zero never ends) is a PlanError saying what it is."""
    if str(path) == os.devnull:  # `--policy /dev/null`: the usual way to say "an empty file"
        return ""
    try:
        # stat first, open only a regular file: opening some devices already does something
        mode, size = (st := os.stat(path)).st_mode, st.st_size
    except OSError as exc:
        if os.path.islink(path) and exc.errno == errno.ENOENT:
            target = os.readlink(path)
            raise _cannot_read(path, f"a symbolic link to a missing file ({target})") from None
        raise _cannot_read(path, _os_reason(exc)) from None
    if (reason := _not_regular(mode)) is not None:
        raise _cannot_read(path, reason)
    if size > MAX_FILE_BYTES:
        raise _cannot_read(path, _too_big(size))
    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not block the read
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        with os.fdopen(fd, "rb") as f:
            if (reason := _not_regular(os.fstat(f.fileno()).st_mode)) is not None:
                raise _cannot_read(path, reason)
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise _cannot_read(path, _os_reason(exc)) from None
    if len(data) > MAX_FILE_BYTES:  # it grew since the stat
        raise _cannot_read(path, _too_big(len(data)))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _cannot_read(path, f"not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return "no such file or folder"
    if exc.errno == errno.ELOOP:
        return "cannot read: too many levels of symbolic links (a symbolic link loop?)"
    return f"cannot read: {exc.strerror or exc}"


def _too_big(size: int) -> str:
    return f"file is {size:,} bytes, over the limit of {MAX_FILE_BYTES:,} bytes: is it a plan?"


def _field_path(loc: tuple[int | str, ...]) -> str:
    # pydantic puts the model-validator's own tag in loc for unions; drop the noise
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    if parts[:2] == ["message", "steps"] and parts[3:4] == ["fields"]:
        del parts[3]  # a step's texts are written beside its `variants`, not under `fields`
    return ".".join(parts)


def _message(error: ErrorDetails) -> str:
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


MAX_PROBLEMS = 20  # per file: a list of 10,000 bad items is one mistake, not 10,000 lines


def _problems(source: str, exc: ValidationError) -> PlanError:
    errors = exc.errors()
    problems = [_problem(source, err) for err in errors[:MAX_PROBLEMS]]
    if len(errors) > MAX_PROBLEMS:
        more = f"and {len(errors) - MAX_PROBLEMS} more problems like these"
        problems.append(PlanProblem(source, "", more))
    return PlanError(problems)


def _problem(source: str, error: ErrorDetails) -> PlanProblem:
    field, reason = _field_path(error["loc"]), _message(error)
    if error["type"] == "value_error" and (match := _LEADING_FIELD.match(reason)):
        field = f"{field}.{match[1]}" if field else match[1]
        reason = match[2]
    return PlanProblem(source, field, reason)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, bounded: nesting depth, and a plain error (with its line) for scalars
    PyYAML resolves and then fails to build (day 30 of February, `!!int eight`), which it raises
    as ValueError or worse rather than as a YAMLError."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # The composer recurses once per level: a thousand `[` would be a RecursionError.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]  # types-PyYAML
                mark = event.start_mark
                raise yaml.composer.ComposerError(None, None, _TOO_DEEP, mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, AttributeError, OverflowError) as exc:
            tag = str(node.tag).replace("tag:yaml.org,2002:", "!!")
            value = str(node.value)[:40] if isinstance(node, yaml.ScalarNode) else "this value"
            why = str(exc).split(";")[0] if isinstance(exc, ValueError) else "not in its format"
            reason = f"cannot read {value!r} as {tag}: {why} (quote it if it is text)"
            raise yaml.constructor.ConstructorError(None, None, reason, node.start_mark) from None


_TOO_DEEP = f"nested more than {MAX_DEPTH} levels deep"


def _bounded(data: object, source: str) -> None:
    """Aliases can repeat a subtree without end (`&a [*a]`, or a billion laughs): bound what the
    validation will walk, counting each use of an alias."""
    budget, stack = MAX_NODES, [(data, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if depth > MAX_DEPTH or budget < 0:
            why = _TOO_DEEP if depth > MAX_DEPTH else f"over {MAX_NODES:,} values"
            reason = f"not valid YAML: too large once its aliases are expanded ({why})"
            raise PlanError([PlanProblem(source, "", reason)])
        if isinstance(item, dict):
            stack.extend((part, depth + 1) for pair in item.items() for part in pair)
        elif isinstance(item, list):
            stack.extend((part, depth + 1) for part in item)


def _yaml(text: str, source: str) -> object:
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader
    except yaml.reader.ReaderError as exc:
        char = f"U+{exc.character:04X}" if isinstance(exc.character, int) else exc.character
        reason = f"character {char} is not allowed in YAML text ({exc.reason})"
        where = f"character {exc.position + 1}"
        raise PlanError([PlanProblem(source, where, f"not valid YAML: {reason}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise PlanError([PlanProblem(source, where, f"not valid YAML: {reason}")]) from None
    _bounded(data, source)
    return data


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
        raise _problems(source, exc) from None


def content_hash(plan: Plan) -> str:
    data = plan.model_dump(mode="json")
    # Plans written before `delivery` existed keep their version (and their schedules).
    if plan.delivery == Delivery():
        del data["delivery"]
    # ... and before `adapt` and `message.extra` (issue 13).
    if not plan.adapt:
        del data["adapt"]
    if not plan.message.extra:
        del data["message"]["extra"]
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_plan_file(path: Path) -> LoadedPlan:
    name = os.fsencode(path)
    if name != name.decode("utf-8", "ignore").encode():  # the daemon stores file names as text
        shown = name.decode("utf-8", "backslashreplace")  # printable in any locale
        raise PlanError([PlanProblem(shown, "", "the file name is not UTF-8 text: rename it")])
    plan = parse_plan(read_text(path), str(path))
    return LoadedPlan(plan, path, content_hash(plan))


def checked_alone(source: str, check: Callable[[], T]) -> T:
    """`check()` for one file: a failure nobody foresaw becomes that file's problem, so one file
    can never stop the others from loading (and `validate` never prints a traceback)."""
    try:
        return check()
    except PlanError:
        raise
    except Exception as exc:
        log.debug("checking %s failed unexpectedly", source, exc_info=True)
        reason = f"could not be checked ({type(exc).__name__}: {exc}); this is a bug: report it"
        raise PlanError([PlanProblem(source, "", reason.replace("\n", " "))]) from None


def load_plans(
    paths: Iterable[Path], owners: Mapping[str, str] | None = None
) -> tuple[list[LoadedPlan], list[PlanProblem]]:
    """Every valid plan under `paths`, and the problems of the invalid ones.

    A plan id belongs to one file: `owners[id]` (the file the running plan came from) while that
    file exists, else the first file that defines it. Another file claiming it is a problem.
    """
    candidates: list[LoadedPlan] = []
    problems: list[PlanProblem] = []
    for path in plan_files(paths):
        try:
            candidates.append(checked_alone(str(path), partial(load_plan_file, path)))
        except PlanError as exc:
            problems.extend(exc.problems)
    owner: dict[str, str] = {}
    for item in candidates:
        known = (owners or {}).get(item.plan.id)
        owner.setdefault(
            item.plan.id, known if known and os.path.lexists(known) else str(item.path)
        )
    loaded = [item for item in candidates if owner[item.plan.id] == str(item.path)]
    for item in candidates:
        if owner[item.plan.id] != str(item.path):
            reason = (
                f"plan id {item.plan.id!r} is also used by {owner[item.plan.id]}, which defined "
                "it first: give this plan its own id (the running plan is unchanged)"
            )
            problems.append(PlanProblem(str(item.path), "id", reason))
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
        raise _problems(source, exc) from None


def load_policy(path: Path) -> Policy:
    """The policy in `path` (a policy file, or a plans folder's `policy.yaml`); the built-in
    defaults when there is no such file. Raises PlanError for an invalid one."""
    if path.is_dir():
        path = path / POLICY_FILE
    if not os.path.lexists(path):  # a broken link is reported, not taken for "no policy"
        return Policy()
    return checked_alone(str(path), lambda: parse_policy(read_text(path), str(path)))


def policy_file_for(path: Path) -> Path:
    """Where the policy of a plan file or folder is: `policy.yaml` in the plans folder."""
    return (path if path.is_dir() else path.parent) / POLICY_FILE


@dataclass
class Checked:
    plans: list[LoadedPlan] = field(default_factory=list)  # valid, and within the policy
    problems: list[PlanProblem] = field(default_factory=list)
    policies: list[Path] = field(default_factory=list)  # policy files named and found valid


def check_plans(
    paths: Iterable[Path],
    now: datetime,
    policy_file: Path | None = None,
    owners: Mapping[str, str] | None = None,
) -> Checked:
    """`reminders validate`: the plans under `paths`, checked against their folder's policy (or
    `policy_file`) for everything that does not depend on a user (`rules.static_violations`).
    Each file is checked on its own: its problems never keep another file from loading.
    `owners` (plan id -> file) are the files the running plans came from (`load_plans`)."""
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
        if path.name == POLICY_FILE and not path.is_dir() and policy_at(path) is not None:
            checked.policies.append(path)
    loaded, load_problems = load_plans(paths, owners)
    checked.problems.extend(load_problems)
    for item in loaded:
        policy = policy_at(policy_file or policy_file_for(item.path))
        if policy is None:
            continue  # its problems are reported; the plan cannot be checked against it
        try:
            check = partial(static_violations, item.plan, policy, now)
            violations = checked_alone(str(item.path), check)
        except PlanError as exc:
            checked.problems.extend(exc.problems)
            continue
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
