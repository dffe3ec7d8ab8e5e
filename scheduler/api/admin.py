"""The admin API: plan status, engagement figures, pause / resume / cancel, opt-outs, stopping an
enrolment, the audit log, a rescan of the plans folder, and Prometheus metrics.

Every /v1 route here needs a token with the `admin` scope; the token's name is the actor recorded
in the audit log. `/metrics` is unauthenticated, as Prometheus scrapers expect: it carries counts,
never message content or user ids, and the API should listen on a private address anyway.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field

from scheduler.api.app import (
    API_VERSION,
    ApiError,
    Caller,
    authenticate,
    bearer,
    lifecycle_of,
    refused,
    require,
)
from scheduler.api.fields import Id, Note, Reason
from scheduler.app import engagement, metrics
from scheduler.app.lifecycle import ActionResult, LifecycleError
from scheduler.app.status import overview, plan_status, replicas
from scheduler.domain.engagement import Grouping, range_problem, zone_problem
from scheduler.store.engagement import UnknownZone
from scheduler.store.postgres import Store

router = APIRouter(prefix=f"/{API_VERSION}", tags=["admin"])
metrics_router = APIRouter(tags=["health"])

Admin = Annotated[Caller, Depends(require("admin"))]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReasonBody(Body):
    reason: Reason


class ResumeBody(Body):
    mode: Literal["skip", "catch_up"] = Field(
        "skip",
        description="skip: what the pause held back is recorded skipped (paused); catch_up: "
        "what is still within the plan's grace is sent now, the rest recorded missed.",
    )
    reason: Note | None = None


class OptBody(Body):
    plan: Id | None = Field(None, description="A plan id; leave out for every plan.")
    reason: Note | None = None


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


def _now(request: Request) -> datetime:  # the lifecycle's clock (virtual in tests)
    now: datetime = lifecycle_of(request).clock()
    return now


def actor(caller: Caller) -> str:
    return f"token:{caller.name}"


async def _act(coro: Any) -> dict[str, Any]:
    try:
        result: ActionResult = await coro
    except LifecycleError as exc:
        raise refused(exc) from None
    return result.as_dict()


@router.get("/plans", summary="Every plan: state, version, next fire, outcome counts")
async def list_plans(request: Request, caller: Admin) -> dict[str, Any]:
    return await overview(_store(request), now=_now(request))


@router.get("/fan-outs", summary="Occurrences whose fan-out is under way, with their progress")
async def list_fan_outs(request: Request, caller: Admin) -> dict[str, Any]:
    return {"fan_outs": await _store(request).fanout.progress()}


@router.get("/plans/{plan_id}", summary="One plan's status")
async def get_plan(
    request: Request,
    plan_id: Id,
    caller: Admin,
    next: Annotated[int, Query(ge=1, le=100, description="How many next fire times")] = 5,
) -> dict[str, Any]:
    policy = engagement.policy_of(request.app.state.settings.plans_dir)
    report = await plan_status(
        _store(request),
        plan_id,
        now=_now(request),
        next_n=next,
        window=policy.engagement.attribution_window.as_timedelta(),
        guard=policy.guard_for(plan_id),
    )
    if report is None:
        raise ApiError(404, "unknown_plan", f"no plan {plan_id!r} is loaded")
    report["replicas"] = await replicas(_store(request))
    return report


@router.get(
    "/plans/{plan_id}/engagement",
    summary="Sent, delivered, opened, click-through and cancellation rates (docs/engagement.md)",
)
async def get_engagement(
    request: Request,
    plan_id: Id,
    caller: Admin,
    start: Annotated[
        date | None,
        Query(alias="from", description="First local day of the deliveries (default: the start)"),
    ] = None,
    end: Annotated[
        date | None, Query(alias="to", description="Last local day, included (default: today)")
    ] = None,
    by: Annotated[
        Grouping, Query(description="One row per day, step, version or variant")
    ] = "step",
    tz: Annotated[
        str | None,
        Query(
            max_length=64,
            description="IANA zone of the days (default: a calendar plan's, else UTC)",
        ),
    ] = None,
) -> dict[str, Any]:
    problem = range_problem(start, end) or (zone_problem(tz) if tz is not None else None)
    if problem:
        raise ApiError(422, "invalid_request", problem)
    policy = engagement.policy_of(request.app.state.settings.plans_dir)
    try:
        report = await engagement.report(
            _store(request),
            plan_id,
            now=_now(request),
            window=policy.engagement.attribution_window.as_timedelta(),
            start=start,
            end=end,
            by=by,
            tz=tz,
            guard=policy.guard_for(plan_id),
        )
    except UnknownZone as exc:
        raise ApiError(422, "invalid_request", str(exc)) from None
    if report is None:
        raise ApiError(404, "unknown_plan", f"no plan {plan_id!r} is loaded")
    return report


@router.post("/plans/{plan_id}/pause", summary="Pause: nothing new starts; a fan-out stops")
async def pause(request: Request, plan_id: Id, body: ReasonBody, caller: Admin) -> dict[str, Any]:
    lifecycle = lifecycle_of(request)
    return await _act(lifecycle.pause(plan_id, actor=actor(caller), reason=body.reason))


@router.post("/plans/{plan_id}/resume", summary="Resume, skipping or catching up what was held")
async def resume(
    request: Request, plan_id: Id, caller: Admin, body: ResumeBody | None = None
) -> dict[str, Any]:
    body = body or ResumeBody()
    return await _act(
        lifecycle_of(request).resume(
            plan_id, actor=actor(caller), reason=body.reason, catch_up=body.mode == "catch_up"
        )
    )


@router.post("/plans/{plan_id}/cancel", summary="Cancel for good (history is kept)")
async def cancel(request: Request, plan_id: Id, body: ReasonBody, caller: Admin) -> dict[str, Any]:
    lifecycle = lifecycle_of(request)
    return await _act(lifecycle.cancel(plan_id, actor=actor(caller), reason=body.reason))


@router.post("/users/{user_id}/opt-out", summary="Stop sends to a user from a plan or all")
async def opt_out(request: Request, user_id: Id, body: OptBody, caller: Admin) -> dict[str, Any]:
    return await _act(
        lifecycle_of(request).opt_out(
            user_id, plan_id=body.plan, actor=actor(caller), reason=body.reason
        )
    )


@router.post("/users/{user_id}/opt-in", summary="Undo an opt-out")
async def opt_in(
    request: Request, user_id: Id, caller: Admin, body: OptBody | None = None
) -> dict[str, Any]:
    body = body or OptBody()
    return await _act(
        lifecycle_of(request).opt_in(
            user_id, plan_id=body.plan, actor=actor(caller), reason=body.reason
        )
    )


@router.get("/users/{user_id}/opt-outs", summary="The plans a user is opted out of")
async def user_opt_outs(request: Request, user_id: Id, caller: Admin) -> dict[str, Any]:
    return {"user_id": user_id, "opt_outs": await lifecycle_of(request).opt_outs(user_id)}


@router.post("/enrollments/{plan_id}/{user_id}/stop", summary="End one user's timeline in a plan")
async def stop_enrollment(
    request: Request, plan_id: Id, user_id: Id, body: ReasonBody, caller: Admin
) -> dict[str, Any]:
    return await _act(
        lifecycle_of(request).stop_enrollment(
            plan_id, user_id, actor=actor(caller), reason=body.reason
        )
    )


@router.get("/audit", summary="Admin actions and plan-file changes, newest first")
async def audit(
    request: Request,
    caller: Admin,
    plan: Id | None = None,
    user: Id | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
) -> dict[str, Any]:
    events = await lifecycle_of(request).audit(plan_id=plan, user_id=user, limit=limit)
    return {"events": events}


@router.post("/reload", summary="Rescan the plans folder on every replica")
async def reload(request: Request, caller: Admin) -> dict[str, str]:
    await _store(request).control.notify("reload")
    return {"status": "requested"}


@metrics_router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def prometheus(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Response:
    if "metrics" not in request.app.state.settings.api_public:  # REMINDERS_API_PUBLIC
        authenticate(request, credentials, {"metrics", "admin"})
    window = engagement.attribution_window(request.app.state.settings.plans_dir)
    page = await metrics.render(_store(request), window=window)
    return Response(page, media_type=metrics.CONTENT_TYPE_LATEST)
