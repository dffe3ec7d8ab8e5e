"""Property: whatever the example plans and the policy are mutated into, `reminders validate`
answers 0 or 1 in bounded time, never with a traceback, and every error names a file of the case.

The mutators are bench/fuzz_plans.py's; `bench/fuzz.py plans --cases 10000` runs them longer.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz_plans import ROOT, TIME_LIMIT_S, Mutant, judge, lay_out, mutants, validate_mutant

# Each example takes about 80 ms: together these stay well under 20 s on a busy machine.
FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=TIME_LIMIT_S),
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(mutant=mutants())
def test_validate_survives_any_mutant(tmp_path: Path, mutant: Mutant) -> None:
    what, seconds = validate_mutant(mutant, tmp_path / "case")
    assert what is None, f"{what}\n--- {mutant.source.name} mutated:\n{mutant.text[:2000]}"
    assert seconds < TIME_LIMIT_S


@settings(FUZZ, max_examples=3, deadline=None)
@given(mutant=mutants())
def test_the_validate_command_survives_mutants(tmp_path: Path, mutant: Mutant) -> None:
    """The same through the real command, as a process (its exit status and output as a user
    sees them)."""
    args, files = lay_out(mutant, tmp_path / "case")
    run = subprocess.run(
        [sys.executable, "-m", "scheduler.cli", "validate", "--json", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert judge(run.returncode, run.stdout, run.stderr, files) is None, mutant.text[:2000]


@pytest.mark.parametrize(
    "text", ["zz: " + "[" * 5000 + "]" * 5000, "name: !!timestamp 2026-02-30\n", "#" * 70_000]
)
def test_known_killers_pass_the_judge(tmp_path: Path, text: str) -> None:
    """The judge and the layout themselves: a plan mutant that once crashed is a plain error."""
    mutant = Mutant(ROOT / "plans" / "rehab-weekly.yaml", text)
    what, _ = validate_mutant(mutant, tmp_path / "case")
    assert what is None
