"""Plan-file mutants: the example plans and the policy, broken as a hostile world would.

A mutant is one of `plans/*.yaml` (or `plans/policy.yaml`) changed structurally (keys deleted,
replaced, duplicated or added, types swapped, huge numbers, odd strings, deep nesting) and then as
text (YAML tags, impossible dates, aliases, truncation). `validate_mutant` runs `reminders
validate` on it in-process and says what, if anything, went wrong: a traceback, an exit status
other than 0 or 1, an error that does not name a file of the case, or a bug caught by the loader.

The suite draws a few hundred mutants (tests/unit/test_fuzz_plans.py); `bench/fuzz.py plans` draws
thousands, with the same strategy.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from scheduler.planfiles import POLICY_FILE

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "plans"
SOURCES = sorted(PLANS.glob("*.yaml"))  # the example plans and policy.yaml
TIME_LIMIT_S = 5.0  # one mutant's validation; the slowest legal file takes under 1 s

Draw = Callable[[st.SearchStrategy[Any]], Any]

# Values a hostile file puts anywhere: numbers at and past every limit, odd text, wrong types.
ODD_VALUES: list[Any] = [
    0,
    -1,
    1,
    1000,
    1001,
    2**31,
    2**63,
    10**30,
    float("inf"),
    float("nan"),
    0.5,
    True,
    None,
    "",
    " ",
    "\x00",
    "\t\n",
    "\u202e",
    "A" * 300,
    "中" * 2000,
    "{step:99999999d}",
    "{step:.99999f}",
    "{step:{count}}",
    "{step!r}",
    "{",
    "}}{{",
    "{user.__class__}",
    "9999-12-31",
    "0001-01-01",
    "2026-02-30",
    "25:00",
    "23:59:60",
    "* * * * 9",
    "0 0 31 2 *",
    "*/0 * * * *",
    "1 second",
    "0 hours",
    "99999999999 days",
    "1200 months",
    "Asia/" + "x" * 300,
    "../../../etc/passwd",
    "last",
    [],
    {},
    ["09:00"] * 100,
    [[[[["deep"]]]]],
    {"amount": -5, "unit": "day"},
]

# Scalars as YAML text: tags PyYAML resolves and then fails on, and other YAML oddities.
ODD_SCALARS = [
    "!!int eight",
    "!!int 0x",
    "!!float one",
    "!!timestamp soon",
    "!!timestamp 2026-13-01",
    "!!binary ====",
    "!!set {a, b}",
    "!!omap [a: 1]",
    "!!python/object:os.system ls",
    "!custom x",
    "2026-02-30",
    "2026-12-04 25:00:00",
    "0000-01-01",
    "1" + "0" * 5000,
    ".inf",
    "-.nan",
    "0b102",
    "1:99:99",
    "*undefined",
    "&a [*a]",
    "{? [a]: b}",
    "'unterminated",
    '"\\x00\\ud800"',
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a YAML document (mappings and lists)."""
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    found = []
    for key, child in items:
        found.append((*prefix, key))
        found += _paths(child, (*prefix, key))
    return found


def _parent(data: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        data = data[key]
    return data


# --- structural mutations: on the parsed document ----------------------------------------------


def _delete(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    del _parent(data, path)[path[-1]]


def _replace(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    _parent(data, path)[path[-1]] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))


def _swap_type(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    parent = _parent(data, path)
    value = parent[path[-1]]
    wrap = draw(st.sampled_from([lambda v: [v], lambda v: {"x": v}, str, lambda v: [v, v]]))
    parent[path[-1]] = wrap(value)


def _nest(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    parent = _parent(data, path)
    value = parent[path[-1]]
    for _ in range(draw(st.integers(1, 60))):
        value = [value]
    parent[path[-1]] = value


def _add_key(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    parent = _parent(data, path)
    target = parent[path[-1]]
    if isinstance(target, dict):
        key = draw(st.sampled_from(["x", "id", "count", 5, "on", "every", "steps", "0"]))
        target[key] = copy.deepcopy(draw(st.sampled_from(ODD_VALUES)))


def _hypothesis_text(draw: Draw, data: Any, path: tuple[Any, ...]) -> None:
    _parent(data, path)[path[-1]] = draw(st.text(max_size=40) | st.integers() | st.floats())


STRUCTURAL = [_delete, _replace, _replace, _swap_type, _nest, _add_key, _hypothesis_text]


# --- textual mutations: on the YAML text ---------------------------------------------------------


def _odd_scalar(draw: Draw, text: str) -> str:
    lines = text.splitlines()
    values = [i for i, line in enumerate(lines) if ": " in line and not line.endswith(":")]
    if not values:
        return text
    i = draw(st.sampled_from(values))
    key = lines[i].split(": ", 1)[0]
    lines[i] = f"{key}: {draw(st.sampled_from(ODD_SCALARS))}"
    return "\n".join(lines) + "\n"


def _duplicate_line(draw: Draw, text: str) -> str:
    lines = text.splitlines()
    if not lines:  # truncated to nothing
        return text
    i = draw(st.integers(0, len(lines) - 1))
    return "\n".join(lines[: i + 1] + lines[i:]) + "\n"


def _truncate(draw: Draw, text: str) -> str:
    return text[: draw(st.integers(0, len(text)))]  # a half-written file


def _insert(draw: Draw, text: str) -> str:
    at = draw(st.integers(0, len(text)))
    junk = draw(st.sampled_from(["\t", "\x00", "\ufeff", "---\n", "...\n", "%YAML 1.1\n", ": :"]))
    return text[:at] + junk + text[at:]


def _deep(draw: Draw, text: str) -> str:
    depth = draw(st.integers(20, 3000))
    return text + f"zz: {'[' * depth}{']' * depth}\n"


def _laughs(draw: Draw, text: str) -> str:
    levels = draw(st.integers(2, 9))
    rows = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(rows) + "\n" + text


def _huge(draw: Draw, text: str) -> str:
    return text + "# " + "x" * draw(st.sampled_from([10, 70_000])) + "\n"


TEXTUAL = [_odd_scalar, _odd_scalar, _duplicate_line, _truncate, _insert, _deep, _laughs, _huge]


@dataclass(frozen=True)
class Mutant:
    source: Path  # the example it was made from
    text: str

    @property
    def is_policy(self) -> bool:
        return self.source.name == POLICY_FILE


@st.composite
def mutants(draw: Draw) -> Mutant:
    """An example plan or the policy, mutated 1-3 times structurally and 0-2 times as text."""
    source = draw(st.sampled_from(SOURCES))
    data = yaml.safe_load(source.read_text("utf-8"))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        draw(st.sampled_from(STRUCTURAL))(draw, data, draw(st.sampled_from(paths)))
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False)
    for _ in range(draw(st.integers(0, 2))):
        text = draw(st.sampled_from(TEXTUAL))(draw, text)
    return Mutant(source, text)


# --- running one -------------------------------------------------------------------------------


def lay_out(mutant: Mutant, folder: Path) -> tuple[list[Path], set[str]]:
    """Write the mutant into `folder` as its plans folder would hold it: the arguments to give
    `validate`, and the files its errors may name."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    if mutant.is_policy:  # the mutated policy, with every example plan checked against it
        for source in SOURCES:
            if source.name != POLICY_FILE:
                shutil.copy(source, folder / source.name)
        (folder / POLICY_FILE).write_text(mutant.text, encoding="utf-8")
        return [folder], {str(folder / p.name) for p in SOURCES}
    shutil.copy(PLANS / POLICY_FILE, folder / POLICY_FILE)
    target = folder / mutant.source.name
    target.write_text(mutant.text, encoding="utf-8")
    return [target], {str(target), str(folder / POLICY_FILE)}


def judge(code: object, out: str, err: str, files: set[str]) -> str | None:
    """What is wrong with one `reminders validate --json` run, or None."""
    if "Traceback" in out + err:
        return "traceback: " + (err or out)[-300:]
    if code not in (0, 1):
        return f"exit status {code}"
    if err:
        return f"unexpected stderr: {err[:300]}"
    report = json.loads(out)
    for error in report["errors"]:
        if error["file"] not in files:
            return f"an error names no file of the case: {error}"
        if "this is a bug" in error["reason"]:
            return f"the loader caught a bug: {error['reason']}"
        if "\n" in error["field"] + error["reason"]:
            return f"an error of several lines: {error}"
    if code == 1 and not report["errors"] and report["valid"]:
        return "exit status 1 without an error"
    return None


def validate_mutant(mutant: Mutant, folder: Path) -> tuple[str | None, float]:
    """Run `reminders validate --json` on the mutant in-process: (what went wrong, seconds)."""
    from scheduler.cli import main

    args, files = lay_out(mutant, folder)
    out, err = io.StringIO(), io.StringIO()
    started = time.monotonic()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code: object = main(["validate", "--json", *map(str, args)])
    except Exception as exc:  # what the fuzzing is for: any escape is a traceback
        return f"traceback: {type(exc).__name__}: {exc}", time.monotonic() - started
    return judge(code, out.getvalue(), err.getvalue(), files), time.monotonic() - started
