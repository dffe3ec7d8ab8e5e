"""Rendering the message of one step for one user. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from zoneinfo import ZoneInfo

from scheduler.domain.plan import Plan


class RenderError(ValueError):
    """A message could not be rendered (an enrolment lacks a variable the text uses)."""


class _Strict(dict[str, object]):
    def __missing__(self, key: str) -> object:
        raise RenderError(f"variable {{{key}}} has no value for this user")


def render(
    plan: Plan,
    step: int,
    due_at: datetime,
    tz: ZoneInfo,
    user: str,
    variables: Mapping[str, object],
) -> dict[str, str]:
    """The template data for `step` (from 1): the step's own texts over the plan's defaults."""
    local = due_at.astimezone(tz)
    values = _Strict(variables)
    values.update(
        step=step,
        count=plan.occurrence_limit or "",
        date=local.strftime("%Y-%m-%d"),
        time=local.strftime("%H:%M"),
        plan_name=plan.name,
        user=user,
    )
    texts = {**plan.message.default, **plan.message.steps.get(step, {})}
    try:
        return {key: text.format_map(values) for key, text in texts.items()}
    except (ValueError, IndexError, AttributeError) as exc:  # a bad format spec for this value
        raise RenderError(str(exc)) from None
