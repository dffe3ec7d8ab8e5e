"""What the `reminders` subcommands share: the usage error, settings, argument parsing helpers
and running a command against the database."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from scheduler.errors import RemindersError
from scheduler.settings import Settings, load_settings

if TYPE_CHECKING:
    from scheduler.domain.plan import Plan
    from scheduler.store.postgres import Store

T = TypeVar("T")


class UsageError(RemindersError):
    pass


def settings_for(args: argparse.Namespace) -> Settings:
    settings = load_settings()
    if getattr(args, "plans", None):
        settings = settings.model_copy(update={"plans_dir": Path(args.plans)})
    return settings


def aware(text: str, what: str, default_tz: ZoneInfo | None = None) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{what}: {text!r} is not an ISO date-time, e.g. 2026-03-01T09:00+08:00"
        ) from None
    if moment.tzinfo is None:
        if default_tz is None:
            raise UsageError(f"{what}: {text!r} needs a UTC offset, e.g. 2026-03-01T09:00+08:00")
        moment = moment.replace(tzinfo=default_tz)
    return moment


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise UsageError(f"--tz: {name!r} is not an IANA time zone, e.g. Asia/Shanghai") from None


def pairs(items: Sequence[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--var {item!r}: write key=value")
        pairs.append((key, value))
    return pairs


async def with_store(settings: Settings, work: Callable[[Store], Awaitable[T]]) -> T:
    from scheduler.store.embedded import database_url
    from scheduler.store.postgres import Store

    async with Store.open(database_url(settings, announce=False)) as store:
        await store.migrate()
        return await work(store)


def run_with_store(args: argparse.Namespace, work: Callable[[Store], Awaitable[T]]) -> T:
    """Run `work` on the database the command's settings name."""
    return asyncio.run(with_store(settings_for(args), work))


def adapt_notes(plan: Plan) -> list[str]:
    """What `preview` and `simulate` say of a plan's adapt rules: they depend on what each user
    did (opens, reported activity), which neither can know."""
    from scheduler.domain.adapt import describe

    if not plan.adapt:
        return []
    rules = "; ".join(describe(i, rule) for i, rule in enumerate(plan.adapt))
    return [
        f"{plan.id} has adapt rules, which depend on each user's opens and activity (not known "
        f"here): {rules}; shown for a user of whom nothing is reported (the plain timeline)"
    ]
