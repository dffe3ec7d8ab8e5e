"""Rendering the message of one step for one user. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from zoneinfo import ZoneInfo

from scheduler.domain.plan import Plan, placeholders
from scheduler.domain.variants import choose


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
    variant: str | None = None,
    *,
    extra: str | None = None,
) -> dict[str, str]:
    """The template data for `step` (from 1): the step's own texts over the plan's defaults, and
    `variant`'s (one of the step's variants, `variant_for`) over both; or, given `extra`, that
    extra step's texts (message.extra) over the defaults, sent at `step`."""
    date, time = _local_date_and_time(due_at, tz)
    values = _Strict(variables)
    values.update(
        step=step,
        count=plan.occurrence_limit or "",
        date=date,
        time=time,
        plan_name=plan.name,
        user=user,
    )
    texts = plan.message.texts(step, variant, extra=extra)
    try:
        return {key: _checked(text).format_map(values) for key, text in texts.items()}
    except (ValueError, IndexError, AttributeError) as exc:  # a bad format spec for this value
        raise RenderError(str(exc)) from None


def variant_for(plan: Plan, step: int, user: str) -> str | None:
    """The variant of `step` that `user` gets (scheduler.domain.variants: stable, by weight);
    None when the step has one content."""
    found = plan.message.variants_of(step)
    if found is None:
        return None
    scope, variants = found
    return choose({name: v.weight for name, v in variants.items()}, plan.id, scope, user)


@lru_cache(maxsize=4096)
def _checked(text: str) -> str:
    """`text` if its placeholders are ones a message can use. Validation checks them too, but a
    plan stored before that check must not build a 100 MB string per send either."""
    placeholders(text)
    return text


@lru_cache(maxsize=4096)
def _local_date_and_time(due_at: datetime, tz: ZoneInfo) -> tuple[str, str]:
    """A fan-out renders one due time for thousands of users: format it once (strftime is most
    of a render's cost)."""
    local = due_at.astimezone(tz)
    return local.strftime("%Y-%m-%d"), local.strftime("%H:%M")
