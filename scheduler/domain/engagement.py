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
from typing import Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

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
    """One line of a report: its key (named by the grouping's columns) and its figures."""

    key: dict[str, Any]
    figures: Figures = field(default_factory=Figures)

    def as_json(self) -> dict[str, Any]:
        return {**self.key, **self.figures.as_json()}


def grouped(groups: Iterable[Group], by: Grouping) -> list[Line]:
    """The figures summed per day, per (version, step), per version or per (version, step,
    variant), in key order."""
    sums: dict[tuple[Any, ...], Figures] = {}
    for g in groups:
        k = g.key(by)
        sums[k] = sums.get(k, Figures()) + g.figures
    return [Line(dict(zip(KEYS[by], k, strict=True)), f) for k, f in sorted(sums.items())]


# --- output ---------------------------------------------------------------------------------------


def percent(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.1f}%"


def to_csv(lines: Sequence[Line], by: Grouping) -> str:
    """A header and one row per line; rates as fractions (0.25), empty without sends."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*KEYS[by], *FIGURES])
    for line in lines:
        row = line.as_json()
        writer.writerow(["" if row[c] is None else row[c] for c in (*KEYS[by], *FIGURES)])
    return out.getvalue()


def to_table(lines: Sequence[Line], by: Grouping, overall: Figures) -> str:
    """Aligned columns, rates as percentages, and a total line."""
    keys = KEYS[by]
    head = [k.upper() for k in keys] + ["SENT", "DELIVERED", "OPENED", "CTR", "CANCELLED", "CANC%"]
    rows = [
        [
            *(str(line.key[k]) for k in keys),
            str(line.figures.sent),
            str(line.figures.delivered),
            str(line.figures.opened),
            percent(line.figures.click_through),
            str(line.figures.cancelled),
            percent(line.figures.cancellation_rate),
        ]
        for line in lines
    ]
    rows.append(
        [
            "total",
            *([""] * (len(keys) - 1)),
            str(overall.sent),
            str(overall.delivered),
            str(overall.opened),
            percent(overall.click_through),
            str(overall.cancelled),
            percent(overall.cancellation_rate),
        ]
    )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < len(keys) else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join(fmt(r) for r in [head, *rows])
