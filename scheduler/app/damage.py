"""Stopping the damage: errcodes that say the template, the page, the credentials or the user is
wrong (wechat-api.md §3) are acted on once, for everything they concern, instead of being met
again send after send for the whole audience.

    errcode                         scope      what happens
    43107 template (or account)     template   every active plan on that template is paused, with
          banned                               a reason naming the errcode (audit row, NOTIFY,
    40037 template id invalid       template   status line, metric); the rest of each of those
    41030 page invalid              page       plans' running occurrences is recorded `skipped` with
    token refused after a refresh   app        the errcode's reason instead of being sent, and the
      (40001 twice, bad secret,                pipeline that met it sends nothing more (its queue
      IP not whitelisted...)                   is recorded the same way). An admin resumes.
    40003 openid invalid            user       the user's active enrolments are stopped (audit
                                               rows); the plan goes on for everyone else

A send already on the wire when the first such answer arrives still finishes: at most the
pipeline's concurrency, per replica, meets the errcode after the first.
"""

from __future__ import annotations

import asyncio
import logging
from enum import StrEnum
from urllib.parse import urlsplit

from scheduler.app import metrics
from scheduler.app.lifecycle import Lifecycle, LifecycleError
from scheduler.channels.base import SendResult
from scheduler.domain.outcomes import Outcome, Reason
from scheduler.domain.plan import Plan
from scheduler.store.postgres import Stop, Store

log = logging.getLogger(__name__)

ACTOR = "daemon"


class Scope(StrEnum):
    TEMPLATE = "template"
    PAGE = "page"
    APP = "app"
    USER = "user"


SCOPES: dict[Reason, Scope] = {
    Reason.TEMPLATE_BANNED: Scope.TEMPLATE,
    Reason.BAD_TEMPLATE: Scope.TEMPLATE,
    Reason.BAD_PAGE: Scope.PAGE,
    Reason.TOKEN: Scope.APP,
    Reason.BAD_OPENID: Scope.USER,
}


def scope_of(result: SendResult) -> Scope | None:
    return SCOPES.get(result.reason) if result.reason is not None else None


def concerns(scope: Scope, failing: Plan, other: Plan) -> bool:
    """Does what `failing` met also break `other`?"""
    if scope is Scope.APP:
        return True
    if scope is Scope.TEMPLATE:
        return other.template.id == failing.template.id
    if scope is Scope.PAGE:
        return _path(other.template.page) == _path(failing.template.page)
    return False


def _path(page: str | None) -> str | None:
    return urlsplit(page).path if page is not None else None


def what_broke(scope: Scope, plan: Plan, result: SendResult) -> str:
    """The pause reason: the errcode, what it names, what to do."""
    code = f"WeChat errcode {result.errcode}" if result.errcode else "WeChat"
    said = f" ({result.detail})" if result.detail else ""
    if scope is Scope.TEMPLATE:
        what = f"refused template {plan.template.id} [{result.reason}]{said}"
        fix = "fix the template (WeChat console or plan file), then resume"
    elif scope is Scope.PAGE:
        what = f"refused page {plan.template.page} [{result.reason}]{said}"
        fix = "fix the page in the plan file, then resume"
    else:
        what = f"refused the app's credentials [{result.reason}]{said}"
        fix = "check REMINDERS_WECHAT_APPID/SECRET and the IP whitelist, then resume each plan"
    return f"{code} {what}: {fix}"


class DamageControl:
    def __init__(self, store: Store, lifecycle: Lifecycle, replica_id: str):
        self.store = store
        self.lifecycle = lifecycle
        self.replica_id = replica_id
        self._lock = asyncio.Lock()  # concurrent sends meeting the same errcode act once

    async def stop(self, plan: Plan, user_id: str, result: SendResult) -> Stop | None:
        """Act on a result whose errcode concerns more than its send. Returns the Stop the
        pipeline records its remaining sends with, or None when only the user is concerned."""
        scope = scope_of(result)
        if scope is None:
            return None
        async with self._lock:
            if scope is Scope.USER:
                await self._stop_user(user_id, result)
                return None
            reason = what_broke(scope, plan, result)
            await self._pause(scope, plan, result, reason)
        assert result.reason is not None  # a scope comes from a reason
        return Stop(Outcome.SKIPPED, result.reason, reason)

    async def _pause(self, scope: Scope, failing: Plan, result: SendResult, reason: str) -> None:
        paused = []
        for record in await self.store.active_plans():
            other = Plan.model_validate(record.definition)
            if not concerns(scope, failing, other):
                continue
            try:
                await self.lifecycle.pause(record.id, actor=ACTOR, reason=reason)
            except LifecycleError:
                continue  # paused or cancelled meanwhile (another replica met it too)
            left = await self.store.fanout.stop_occurrences(
                record.id, self.replica_id, Outcome.SKIPPED.value, str(result.reason), reason
            )
            paused.append((record.id, left))
        if paused:
            metrics.DAMAGE_STOPS.labels(scope.value, str(result.errcode or "")).inc()
            log.error(
                "%s: paused %s",
                reason,
                ", ".join(f"{plan_id} ({left} sends not attempted)" for plan_id, left in paused),
                extra={"errcode": result.errcode, "scope": scope.value},
            )

    async def _stop_user(self, user_id: str, result: SendResult) -> None:
        reason = (
            f"WeChat errcode {result.errcode}: openid {user_id} is invalid for this app"
            f" [{result.reason}]"
        )
        stopped = []
        for plan_id in await self.store.active_enrollments_of(user_id):
            try:
                await self.lifecycle.stop_enrollment(plan_id, user_id, actor=ACTOR, reason=reason)
            except LifecycleError:
                continue  # stopped meanwhile
            stopped.append(plan_id)
        if stopped:
            metrics.DAMAGE_STOPS.labels(Scope.USER.value, str(result.errcode or "")).inc()
            log.warning(
                "%s: enrolments stopped in %s",
                reason,
                ", ".join(stopped),
                extra={"errcode": result.errcode, "user": user_id},
            )
