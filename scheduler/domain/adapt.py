"""Behaviour-driven cadence: which adapt rule decides a due user's step. Pure: `now` is passed in.

A plan's `adapt` rules (docs/plans.md#adapt) look at what was last reported of the user
(an open of the mini program, `POST /v1/opens`; any activity, `POST /v1/activity`); the first
rule whose every condition holds decides: skip the plan's step, send a named extra step, or both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from scheduler.domain.plan import AdaptIf, AdaptRule, Duration


@dataclass(frozen=True)
class Seen:
    """What was last reported of one user, of any plan (None: never)."""

    last_open: datetime | None = None
    last_activity: datetime | None = None

    @property
    def last_seen(self) -> datetime | None:
        """The later of the last open and the last activity: an open is activity too."""
        moments = [m for m in (self.last_open, self.last_activity) if m is not None]
        return max(moments) if moments else None


NEVER_SEEN = Seen()


@dataclass(frozen=True)
class Adaptation:
    """What a matching rule does to one user's due step."""

    rule: int  # its index in `adapt`, from 0
    skip: bool  # the plan's step is skipped (ledger: skipped, reason adapted)
    send: str | None  # the extra step to send (message.extra.NAME), if any
    detail: str  # why, naming the rule: the ledger row's detail
    period: datetime | None  # inactive_for: when the inactivity began (the last time seen)


def _matches(when: AdaptIf, seen: Seen, now: datetime) -> bool:
    last = seen.last_seen
    if when.inactive_for is not None and (
        last is None or now - last < when.inactive_for.as_timedelta()
    ):
        return False
    if when.active_within is not None and (
        last is None or now - last > when.active_within.as_timedelta()
    ):
        return False
    return when.opened_within is None or (
        seen.last_open is not None and now - seen.last_open <= when.opened_within.as_timedelta()
    )


def _condition(when: AdaptIf) -> str:
    parts = [
        f"{name} {value}"
        for name, value in (
            ("inactive_for", when.inactive_for),
            ("active_within", when.active_within),
            ("opened_within", when.opened_within),
        )
        if isinstance(value, Duration)
    ]
    return " and ".join(parts)


def _moment(value: datetime | None) -> str:
    return "never" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def describe(index: int, rule: AdaptRule) -> str:
    """A rule as the ledger and `preview` name it: `adapt.0 (inactive_for 7 days: send X)`."""
    actions = [a for a in (rule.send and f"send {rule.send}", rule.skip and "skip") if a]
    return f"adapt.{index} ({_condition(rule.when)}: {', '.join(actions)})"


def decide(rules: Sequence[AdaptRule], seen: Seen, now: datetime) -> Adaptation | None:
    """The first rule whose conditions all hold for `seen` at `now`, or None (the plain step)."""
    for index, rule in enumerate(rules):
        if not _matches(rule.when, seen, now):
            continue
        detail = (
            f"{describe(index, rule)}: last open {_moment(seen.last_open)}, "
            f"last activity {_moment(seen.last_activity)}"
        )
        period = seen.last_seen if rule.when.inactive_for is not None else None
        return Adaptation(index, rule.skip, rule.send, detail, period)
    return None


def extra_occurrence(name: str, adaptation: Adaptation, step: int) -> str:
    """The ledger key of an extra step. Sent for inactivity, it is keyed by when the inactivity
    began, so the ledger's uniqueness makes it at most once per inactivity period (later steps,
    double fires and other replicas meet the same row); otherwise by the step it goes with."""
    if adaptation.period is not None:
        return f"extra:{name}:since:{adaptation.period.astimezone(UTC).isoformat()}"
    return f"extra:{name}:step-{step}"
