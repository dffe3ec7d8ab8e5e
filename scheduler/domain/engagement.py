"""Engagement figures: sends, deliveries, opens and cancellations, their rates, and their tables.
Pure: the counts come from `scheduler.store.engagement` (where attribution is decided), already
per delivery, so any grouping is a sum. docs/engagement.md explains every figure.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from fractions import Fraction
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.domain.policy import Guard

Grouping = Literal["day", "step", "version", "variant"]
GROUPINGS: tuple[str, ...] = get_args(Grouping)
Format = Literal["table", "csv", "json"]
FORMATS: tuple[str, ...] = get_args(Format)
WINDOWS = ("24h", "7d", "all")
DEFAULT_VARIANT = "default"  # a step's only content, until steps have variants

# The key columns of each grouping, in order.
KEYS: dict[str, tuple[str, ...]] = {
    "day": ("day",),
    "step": ("version", "step"),
    "version": ("version",),
    "variant": ("version", "step", "variant"),
}
FIGURES = ("sent", "delivered", "opened", "click_through", "cancelled", "cancellation_rate")


# Report bounds: dates whose local midnights every time zone, Python and PostgreSQL can hold.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9999, 12, 30)


def range_problem(start: date | None, end: date | None) -> str | None:
    """Why [start, end] cannot be reported on, or None."""
    for name, day in (("from", start), ("to", end)):
        if day is not None and not FIRST_DAY <= day <= LAST_DAY:
            return f"{name}: {day} is not between {FIRST_DAY} and {LAST_DAY}"
    if start is not None and end is not None and start > end:
        return f"from {start} is after to {end}"
    return None


def zone_problem(name: str) -> str | None:
    """Why `name` is not a time zone to count days in, or None."""
    try:
        if len(name) > 64:
            raise ValueError
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a folder, a long path
        return f"{name!r} is not an IANA time zone, e.g. Asia/Shanghai"
    return None


def ratio(part: int, whole: int) -> float | None:
    """part / whole to four decimals; None when there is no whole (no sends: no rate)."""
    return round(part / whole, 4) if whole else None


Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95 % interval


def wilson(part: int, whole: int, z: float = Z_95) -> tuple[float, float] | None:
    """The Wilson score interval of the rate part / whole (95 % by default), to four decimals;
    None when there is no whole. Unlike the normal approximation it stays inside [0, 1] and is
    not empty at 0 % or 100 %, which matters for a variant's few hundred sends."""
    if whole <= 0:
        return None
    if not 0 <= part <= whole:
        raise ValueError(f"{part} of {whole} is not a rate")
    p, z2 = part / whole, z * z
    centre = (p + z2 / (2 * whole)) / (1 + z2 / whole)
    half = z / (1 + z2 / whole) * (p * (1 - p) / whole + z2 / (4 * whole * whole)) ** 0.5
    # exact at the edges: 0 % has a lower bound of 0, 100 % an upper bound of 1
    low = 0.0 if part == 0 else max(0.0, centre - half)
    high = 1.0 if part == whole else min(1.0, centre + half)
    return round(low, 4), round(high, 4)


INTERVALS = ("click_through_ci", "cancellation_rate_ci")  # the JSON keys of a variant's intervals


@dataclass(frozen=True, slots=True, kw_only=True)
class Figures:
    """What a set of deliveries led to. `sent`: WeChat accepted them; `delivered`: its sent
    event said success; `opened`: opened at least once from the card; `cancelled`: a
    cancellation was attributed to them. Each counts deliveries, so figures add up."""

    sent: int = 0
    delivered: int = 0
    opened: int = 0
    cancelled: int = 0

    def __add__(self, other: Figures) -> Figures:
        return Figures(
            sent=self.sent + other.sent,
            delivered=self.delivered + other.delivered,
            opened=self.opened + other.opened,
            cancelled=self.cancelled + other.cancelled,
        )

    @property
    def click_through(self) -> float | None:
        """opened / sent."""
        return ratio(self.opened, self.sent)

    @property
    def cancellation_rate(self) -> float | None:
        """cancelled / sent."""
        return ratio(self.cancelled, self.sent)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figures:
        """The counts of an `as_json` (the rates are derived, so left out)."""
        return cls(
            sent=data["sent"],
            delivered=data["delivered"],
            opened=data["opened"],
            cancelled=data["cancelled"],
        )

    def intervals(self) -> dict[str, list[float] | None]:
        """The 95 % Wilson intervals of the click-through and cancellation rates, as JSON."""
        ctr, canc = wilson(self.opened, self.sent), wilson(self.cancelled, self.sent)
        return {
            "click_through_ci": None if ctr is None else list(ctr),
            "cancellation_rate_ci": None if canc is None else list(canc),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "opened": self.opened,
            "click_through": self.click_through,
            "cancelled": self.cancelled,
            "cancellation_rate": self.cancellation_rate,
        }


def total(figures: Iterable[Figures]) -> Figures:
    out = Figures()
    for f in figures:
        out = out + f
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Group:
    """The deliveries of one plan version, step, variant and local day, of one age: 1 (due in
    the last 24 hours), 7 (in the 7 days before those) or 0 (older)."""

    version: int
    step: int
    variant: str
    day: date
    age: int
    figures: Figures

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Group:
        """One row of `EngagementStore.rows`."""
        return cls(
            version=row["plan_version"],
            step=row["step"],
            variant=row["variant"] or DEFAULT_VARIANT,
            day=row["day"],
            age=row["age"],
            figures=Figures(
                sent=row["sent"],
                delivered=row["delivered"],
                opened=row["opened"],
                cancelled=row["cancelled"],
            ),
        )

    def key(self, by: Grouping) -> tuple[Any, ...]:
        return tuple(
            self.day.isoformat() if name == "day" else getattr(self, name) for name in KEYS[by]
        )


def windows(groups: Iterable[Group]) -> dict[str, Figures]:
    """The last 24 hours, the last 7 days (those 24 hours included) and everything."""
    groups = list(groups)
    return {
        "24h": total(g.figures for g in groups if g.age == 1),
        "7d": total(g.figures for g in groups if g.age in (1, 7)),
        "all": total(g.figures for g in groups),
    }


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a report: its key (named by the grouping's columns), its figures, and, for
    a step's line, whether its click-through is under the policy's floor (None: not judged)."""

    key: dict[str, Any]
    figures: Figures = field(default_factory=Figures)
    low_click_through: bool | None = None

    def as_json(self) -> dict[str, Any]:
        flag = {} if self.low_click_through is None else {FLAG: self.low_click_through}
        # A variant's rates come with their intervals: which wording is better, or not yet known.
        ci = self.figures.intervals() if "variant" in self.key else {}
        return {**self.key, **self.figures.as_json(), **ci, **flag}


FLAG = "low_click_through"


def grouped(groups: Iterable[Group], by: Grouping) -> list[Line]:
    """The figures summed per day, per (version, step), per version or per (version, step,
    variant), in key order."""
    sums: dict[tuple[Any, ...], Figures] = {}
    for g in groups:
        k = g.key(by)
        sums[k] = sums.get(k, Figures()) + g.figures
    return [Line(dict(zip(KEYS[by], k, strict=True)), f) for k, f in sorted(sums.items())]


# --- output ---------------------------------------------------------------------------------------


LOW_CTR = "low CTR"  # the flag of a step whose click-through is under the floor


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def _flagged(lines: Sequence[Line]) -> bool:
    return any(line.low_click_through is not None for line in lines)


def to_csv(lines: Sequence[Line], by: Grouping) -> str:
    """A header and one row per line; rates as fractions (0.25), empty without sends; steps'
    lines end with `low_click_through` (true or false) when they were judged."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    bounds = CI_COLUMNS if by == "variant" else ()
    columns = (*KEYS[by], *FIGURES, *bounds, *((FLAG,) if _flagged(lines) else ()))
    writer.writerow(columns)
    for line in lines:
        row = line.as_json()
        for name in INTERVALS if bounds else ():
            interval = row.pop(name)
            row[f"{name}_low"], row[f"{name}_high"] = interval or (None, None)
        writer.writerow(
            [
                "" if row.get(c) is None else str(row[c]).lower() if c == FLAG else row[c]
                for c in columns
            ]
        )
    return out.getvalue()


# A variant's CSV row: each interval as two columns, empty without sends.
CI_COLUMNS = tuple(f"{name}_{end}" for name in INTERVALS for end in ("low", "high"))


def interval_text(interval: tuple[float, float] | None) -> str:
    """An interval as a table writes it: `11.8-76.9%`."""
    if interval is None:
        return "-"
    return f"{interval[0] * 100:.1f}-{interval[1] * 100:.1f}%"


def to_table(lines: Sequence[Line], by: Grouping, overall: Figures) -> str:
    """Aligned columns, rates as percentages, and a total line."""
    keys = KEYS[by]
    flags = _flagged(lines)
    ci = by == "variant"  # each variant's rates with their 95 % Wilson intervals

    def cells(f: Figures) -> list[str]:
        ctr = [percent(f.click_through), *([interval_text(wilson(f.opened, f.sent))] * ci)]
        canc = [
            percent(f.cancellation_rate),
            *([interval_text(wilson(f.cancelled, f.sent))] * ci),
        ]
        return [str(f.sent), str(f.delivered), str(f.opened), *ctr, str(f.cancelled), *canc]

    head = [k.upper() for k in keys] + ["SENT", "DELIVERED", "OPENED", "CTR"]
    head += ["CTR 95% CI"] * ci + ["CANCELLED", "CANC%"] + ["CANC 95% CI"] * ci
    head += ["FLAG"] if flags else []
    rows = [
        [
            *(str(line.key[k]) for k in keys),
            *cells(line.figures),
            *([LOW_CTR if line.low_click_through else ""] if flags else []),
        ]
        for line in lines
    ]
    rows.append(["total", *([""] * (len(keys) - 1)), *cells(overall), *([""] if flags else [])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < len(keys) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(fmt(r) for r in [head, *rows])


# --- the guard (docs/engagement.md, "The guard") --------------------------------------------------

Rule = Literal["limit", "spike"]


def _exact(value: float) -> Fraction:
    """A threshold as the decimal the policy wrote (0.05 is 1/20, not the nearest binary)."""
    return Fraction(repr(value))


def points(rate: Fraction | float) -> str:
    """A rate as the reason text writes it: `7.2 %`."""
    return f"{float(rate) * 100:.1f} %"


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFigures:
    """The recent deliveries of one plan version and step, and per content variant when the
    step had variants (`variants`: name -> figures; empty without)."""

    version: int
    step: int
    figures: Figures
    variants: tuple[tuple[str, Figures], ...] = ()

    def worst_variant(self) -> tuple[str, Figures] | None:
        """The variant with the most cancellations (then the higher rate), if any has one."""
        cancelled = [(n, f) for n, f in self.variants if f.cancelled]
        if not cancelled:
            return None
        return max(cancelled, key=lambda v: (v[1].cancelled, Fraction(v[1].cancelled, v[1].sent)))


@dataclass(frozen=True, slots=True, kw_only=True)
class GuardFigures:
    """What the guard judges: the deliveries due in the recent window, those of the baseline
    window before it, and the recent ones per (version, step)."""

    recent: Figures
    baseline: Figures
    steps: tuple[StepFigures, ...] = ()

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> GuardFigures:
        """The rows of `EngagementStore.guard_counts` (per variant, or per step without one)."""
        recent, baseline = Figures(), Figures()
        steps: dict[tuple[int, int], dict[str, Figures]] = {}
        for r in rows:
            f = Figures(sent=r["sent"], cancelled=r["cancelled"])
            if r["recent"]:
                recent = recent + f
                per = steps.setdefault((r["plan_version"], r["step"]), {})
                name = r.get("variant") or DEFAULT_VARIANT
                per[name] = per.get(name, Figures()) + f
            else:
                baseline = baseline + f
        return cls(
            recent=recent,
            baseline=baseline,
            steps=tuple(
                StepFigures(
                    version=version,
                    step=step,
                    figures=total(per.values()),
                    variants=() if set(per) == {DEFAULT_VARIANT} else tuple(sorted(per.items())),
                )
                for (version, step), per in sorted(steps.items())
            ),
        )

    def worst_step(self) -> StepFigures | None:
        """The recent step with the most cancellations (then the higher rate), if any has one."""
        cancelled = [s for s in self.steps if s.figures.cancelled]
        if not cancelled:
            return None
        return max(
            cancelled,
            key=lambda s: (s.figures.cancelled, Fraction(s.figures.cancelled, s.figures.sent)),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Verdict:
    """The guard's judgement of one plan. `rule`: why it pauses (None: it does not); `figures`:
    the recent rate and the baseline in words; `note`: why it does not judge, or not the
    baseline, when that is so."""

    rule: Rule | None
    figures: str
    note: str | None = None

    @property
    def pause(self) -> bool:
        return self.rule is not None


def judge(observed: GuardFigures, guard: Guard) -> Verdict:
    """Whether the recent deliveries' cancellations pause the plan:

    - judged only from `min_sends` recent sends on;
    - `limit`: the recent rate is over `max_cancellation_rate`;
    - `spike`: with a baseline of at least `baseline_min_sends` sends, the recent rate is above
      the baseline's, at least `spike_factor` times it and at least `spike_margin` above it.

    Rates are compared exactly (cancelled / sent against the thresholds as written)."""
    recent, baseline = observed.recent, observed.baseline
    span, before = guard.recent_window, guard.baseline_window
    if recent.sent == 0:
        return Verdict(rule=None, figures=f"no sends in {span}", note="nothing to judge")
    rate = Fraction(recent.cancelled, recent.sent)
    text = f"cancellations {points(rate)} of {recent.sent:,} sends in {span}"
    has_baseline = baseline.sent >= guard.baseline_min_sends
    if has_baseline:
        base = Fraction(baseline.cancelled, baseline.sent)
        text += f", baseline {points(base)} of {baseline.sent:,} sends in the {before} before"
    else:
        text += f", no baseline ({baseline.sent:,} sends in the {before} before)"
    if recent.sent < guard.min_sends:
        return Verdict(rule=None, figures=text, note=f"not judged under {guard.min_sends:,} sends")
    if rate > _exact(guard.max_cancellation_rate):
        return Verdict(rule="limit", figures=text)
    if not has_baseline:
        return Verdict(
            rule=None,
            figures=text,
            note=f"no spike is judged with a baseline under {guard.baseline_min_sends:,} sends",
        )
    # Above the baseline at all, too: with a margin of 0, a rate of 0 is no spike of a 0 baseline.
    if (
        rate > base
        and rate >= _exact(guard.spike_factor) * base
        and rate - base >= _exact(guard.spike_margin)
    ):
        return Verdict(rule="spike", figures=text)
    return Verdict(rule=None, figures=text)


def thresholds_text(guard: Guard) -> str:
    """The pause rule in words, e.g. for `reminders status PLAN`."""
    if not guard.auto_pause:
        return "automatic pause off"
    return (
        f"pauses over {points(guard.max_cancellation_rate)}, or at {guard.spike_factor:g}x the "
        f"baseline and +{points(guard.spike_margin)}, from {guard.min_sends:,} sends"
    )


def pause_reason(verdict: Verdict, observed: GuardFigures, guard: Guard) -> str:
    """The reason an automatic pause records: the rule met, the figures, the step with the most
    cancellations, and what to do."""
    if verdict.rule == "limit":
        rule = f"over the {points(guard.max_cancellation_rate)} limit"
    else:
        rule = (
            f"a spike (at least {guard.spike_factor:g}x the baseline and "
            f"+{points(guard.spike_margin)})"
        )
    reason = f"engagement guard: {verdict.figures}: {rule}"
    worst = observed.worst_step()
    if worst is not None:
        f = worst.figures
        reason += (
            f"; most after step {worst.step} (version {worst.version}): {f.cancelled:,} of "
            f"{f.sent:,} ({points(Fraction(f.cancelled, f.sent))})"
        )
        if (variant := worst.worst_variant()) is not None:
            name, v = variant
            reason += (
                f", most of them in variant {name}: {v.cancelled:,} of {v.sent:,} "
                f"({points(Fraction(v.cancelled, v.sent))})"
            )
    return reason + ". Check the content, then resume the plan"


def low_click_through(figures: Figures, guard: Guard) -> bool:
    """A step's flag: from `click_through_min_sends` sends on, opened / sent is under
    `min_click_through` (compared exactly)."""
    return (
        guard.min_click_through > 0
        and figures.sent >= guard.click_through_min_sends
        and Fraction(figures.opened, figures.sent) < _exact(guard.min_click_through)
    )


def flag_steps(lines: Sequence[Line], guard: Guard) -> list[Line]:
    """Each step's line with its click-through flag (`low_click_through`). A plan whose report
    has no open at all flags nothing: its mini program may not report opens, and an unmeasured
    0 % is no finding."""
    measured = any(line.figures.opened for line in lines)
    return [
        Line(line.key, line.figures, measured and low_click_through(line.figures, guard))
        for line in lines
    ]
