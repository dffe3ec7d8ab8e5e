"""Fuzzing for longer than the suite does: hostile input, counted.

    .venv/bin/python bench/fuzz.py plans --cases 10000 [--seed 1]

Targets:
  plans   the example plans and plans/policy.yaml mutated (bench/fuzz_plans.py, the same
          strategy as tests/unit/test_fuzz_plans.py), each checked by `reminders validate`
          in-process under a time limit.

A few examples of each kind of failure are printed, then the machine-readable last line

    cases=N tracebacks=T server_errors=S hangs=H

where a traceback is any failure of the command's contract (an exception, an exit status other
than 0 or 1, an error not naming a file of the case), server_errors counts 5xx answers (0 for
plans, which have no server) and a hang is a case over the time limit (it is abandoned).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402


@dataclass
class Tally:
    cases: int = 0
    tracebacks: int = 0
    server_errors: int = 0
    hangs: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def keep(self, kind: str, example: str, most: int = 3) -> None:
        kept = self.examples.setdefault(kind, [])
        if len(kept) < most:
            kept.append(example)

    def last_line(self) -> str:
        return (
            f"cases={self.cases} tracebacks={self.tracebacks} "
            f"server_errors={self.server_errors} hangs={self.hangs}"
        )


class Hang(BaseException):  # not an Exception: no `except Exception` in the code may swallow it
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang


def fuzz_plans(args: argparse.Namespace) -> Tally:
    from bench.fuzz_plans import TIME_LIMIT_S, Mutant, mutants, validate_mutant

    tally = Tally()
    folder = Path(tempfile.mkdtemp(prefix="fuzz-plans-")) / "case"
    signal.signal(signal.SIGALRM, _alarm)
    started = time.monotonic()

    @seed(args.seed)
    @settings(
        max_examples=args.cases,
        phases=[Phase.generate],  # count every failure; no shrinking, no example database
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(mutants())
    def one(mutant: Mutant) -> None:
        tally.cases += 1
        signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT_S)
        try:
            what, _ = validate_mutant(mutant, folder)
        except Hang:
            tally.hangs += 1
            tally.keep("hang", f"{mutant.source.name}: {mutant.text[:500]!r}")
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if what is not None:
            tally.tracebacks += 1
            tally.keep(what.split(":")[0], f"{what}\n  {mutant.source.name}: {mutant.text[:500]!r}")
        if tally.cases % 1000 == 0:
            rate = tally.cases / (time.monotonic() - started)
            print(f"  {tally.cases} cases, {rate:.0f}/s: {tally.last_line()}", flush=True)

    one()
    return tally


TARGETS: dict[str, Callable[[argparse.Namespace], Tally]] = {"plans": fuzz_plans}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=sorted(TARGETS))
    parser.add_argument("--cases", type=int, default=1000, help="how many inputs to try")
    parser.add_argument("--seed", type=int, default=1, help="the random seed (reproducible runs)")
    args = parser.parse_args()
    started = time.monotonic()
    tally = TARGETS[args.target](args)
    for kind, examples in tally.examples.items():
        print(f"{kind}:")
        for example in examples:
            print(f"  {example}")
    print(f"{args.target}: {time.monotonic() - started:.0f} s")
    print(tally.last_line())
    return 0 if tally.tracebacks + tally.server_errors + tally.hangs == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
