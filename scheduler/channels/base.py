"""The channel port: hand one rendered message to a messaging platform."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from scheduler.domain.outcomes import Outcome, Reason


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    touser: str
    template_id: str
    data: Mapping[str, str]  # keyword key (e.g. "thing1") -> value
    page: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome  # SENT or FAILED
    reason: Reason | None = None
    errcode: int | None = None
    msgid: int | None = None
    detail: str | None = field(default=None)  # errmsg or exception text, for the ledger


@dataclass(frozen=True, slots=True)
class Quota:
    """The platform's daily send quota: limit, used and what is left."""

    daily_limit: int
    used: int
    remain: int


class Channel(Protocol):
    async def send(self, message: OutgoingMessage) -> SendResult:
        """Deliver one message; never raises for a platform error, returns FAILED instead."""
        ...

    async def quota(self) -> Quota | None:
        """The day's send quota, or None where it cannot be read (never raises)."""
        ...

    async def aclose(self) -> None: ...
