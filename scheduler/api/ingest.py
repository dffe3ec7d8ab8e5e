"""Ingestion routes: consent popup results, enrolments, opens, activity, and the consent runway.

Every batch is all or nothing: one bad item refuses the request with the reason (and its index)
and stores nothing. Everything stored records the calling token's name as its source.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from scheduler.api.app import ApiError, Caller, lifecycle_of, refused, require
from scheduler.api.fields import (
    MAX_TEMPLATES_PER_POPUP,
    DeliveryId,
    Id,
    Moment,
    Scene,
    StorableText,
    TimeZoneName,
    Variables,
)
from scheduler.app.lifecycle import LifecycleError
from scheduler.domain.consent import Result, Via, consent_problem
from scheduler.domain.enrolment import OPENID, Enrolment, EnrolmentError, prepare
from scheduler.domain.plan import ConsentKind, Plan
from scheduler.domain.tracking import NOTIFICATION_SCENES, TRACKING_PARAM
from scheduler.store.activity import ActivityReport, ActivityStore
from scheduler.store.consent import ConsentReport, ConsentStore, OpenReport

router = APIRouter(prefix="/v1")

OpenId = Annotated[
    str,
    Field(
        pattern=OPENID.pattern,
        description="The user's openid for this appid (1-64 of A-Z a-z 0-9 _ -).",
        examples=["oUpF8uMuAJO_M2pxb1Q9zNjWeS6o"],
    ),
]
OpenIdPath = Annotated[str, Path(pattern=OPENID.pattern)]
Choice = Literal["accept", "reject", "ban", "filter"]


def consent_store(request: Request) -> ConsentStore:
    consent: ConsentStore = request.app.state.store.consent
    return consent


Store = Annotated[ConsentStore, Depends(consent_store)]
Ingest = Annotated[Caller, Depends(require("ingest"))]


def _now() -> datetime:
    return datetime.now(UTC)


# --- consent ------------------------------------------------------------------------------------


class Popup(BaseModel):
    """One `wx.requestSubscribeMessage` result, as the mini program got it."""

    model_config = ConfigDict(extra="forbid")
    openid: OpenId
    kind: ConsentKind = Field(description="The kind of the templates requested in this popup.")
    results: dict[Id, Choice] = Field(
        min_length=1,
        max_length=MAX_TEMPLATES_PER_POPUP,
        description="Template id -> accept / reject / ban / filter: the success result of "
        "wx.requestSubscribeMessage (its errMsg key is ignored).",
        examples=[{"tmpl_rehab_weekly": "accept"}],
    )
    at: Moment | None = Field(
        None, description="When the user chose (default: when the report arrives)."
    )
    id: Id | None = Field(
        None,
        description="Your id for this popup: a retried report with the same id is applied once.",
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_errmsg(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("results"), dict):
            results = {k: v for k, v in value["results"].items() if k != "errMsg"}
            value = {**value, "results": results}
        return value


class ConsentBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    popups: list[Popup] = Field(min_length=1, max_length=1000)


class ConsentOut(BaseModel):
    openid: str
    template_id: str
    credits: int = Field(description="One-time sends granted and not yet used.")
    long_term: bool
    banned: bool


class ConsentRecorded(BaseModel):
    recorded: int = Field(description="Choices appended to the history.")
    duplicates: int = Field(description="Already recorded (same popup id): applied once.")
    corroborating: int = Field(
        description="Accepts WeChat's push had already reported (or vice versa): not counted twice."
    )
    consent: list[ConsentOut]


@router.post(
    "/consent",
    tags=["consent"],
    summary="Record consent popup results",
    response_model=ConsentRecorded,
)
async def post_consent(batch: ConsentBatch, caller: Ingest, store: Store) -> ConsentRecorded:
    known = await store.template_kinds()
    for index, popup in enumerate(batch.popups):
        for template_id in popup.results:
            problem = consent_problem(known, template_id, popup.kind)
            if problem is not None:
                raise ApiError(
                    422,
                    problem.code,
                    f"popups.{index}: {problem.message}",
                    index=index,
                    template_id=template_id,
                    known=sorted(known),
                )
    reports = [
        ConsentReport(
            user_id=popup.openid,
            template_id=template_id,
            result=Result(choice),
            source=f"api:{caller.name}",
            kind=popup.kind,
            via=Via.POPUP,
            occurred_at=popup.at,
            event_id=f"api:{caller.name}:{popup.id}:{template_id}" if popup.id else None,
            raw=popup.model_dump(mode="json"),
        )
        for popup in batch.popups
        for template_id, choice in popup.results.items()
    ]
    recorded = await store.record(reports)
    return ConsentRecorded(
        recorded=recorded.appended,
        duplicates=recorded.duplicates,
        corroborating=recorded.corroborating,
        consent=[
            ConsentOut(
                openid=user,
                template_id=template,
                credits=state.credits,
                long_term=state.long_term,
                banned=state.banned,
            )
            for (user, template), state in sorted(recorded.states.items())
        ],
    )


@router.get(
    "/consent/{openid}",
    tags=["consent"],
    summary="A user's current consent and its history",
)
async def get_consent(
    openid: OpenIdPath,
    caller: Ingest,
    store: Store,
    template_id: Id | None = None,
) -> dict[str, Any]:
    states = await store.states(openid)
    history = await store.history(openid, template_id)
    return {
        "openid": openid,
        "consent": [
            {"template_id": t, "credits": s.credits, "long_term": s.long_term, "banned": s.banned}
            for t, s in states.items()
            if template_id is None or t == template_id
        ],
        "history": [
            {
                "id": h["id"],
                "template_id": h["template_id"],
                "result": h["result"],
                "kind": h["kind"],
                "via": h["via"],
                "source": h["source"],
                "occurred_at": h["occurred_at"].isoformat(),
                "recorded_at": h["recorded_at"].isoformat(),
                "event_id": h["event_id"],
                "delivery_id": h["delivery_id"],
                "corroborates": h["corroborates"],
            }
            for h in history
        ],
    }


# --- enrolments ---------------------------------------------------------------------------------


class EnrollmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan_id: Id
    openid: OpenId
    start: Moment | None = Field(
        None, description="When the user's timeline starts, with a UTC offset (default: now)."
    )
    tz: TimeZoneName | None = Field(
        None,
        description="The user's IANA time zone (default: the calendar plan's, or Asia/Shanghai).",
    )
    variables: Variables = Field(default_factory=dict, description="The plan's per-user variables.")


class EnrollmentBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enrollments: list[EnrollmentIn] = Field(min_length=1, max_length=10_000)


def _one_or_many(value: Any) -> str:
    return "many" if isinstance(value, dict) and "enrollments" in value else "one"


EnrollmentBody = Annotated[
    Annotated[EnrollmentIn, Tag("one")] | Annotated[EnrollmentBatch, Tag("many")],
    Discriminator(_one_or_many),
]


class EnrollmentOut(BaseModel):
    plan_id: str
    openid: str
    start: datetime
    tz: str
    next_due_at: datetime | None = Field(description="Relative plans: when step 1 is due.")


class Enrolled(BaseModel):
    enrolled: int
    enrollments: list[EnrollmentOut]


async def _plans(request: Request, plan_ids: set[str]) -> dict[str, Plan]:
    store = request.app.state.store
    plans, missing = {}, []
    for plan_id in sorted(plan_ids):
        record = await store.plan(plan_id)
        if record is None:
            missing.append(plan_id)
        else:
            plans[plan_id] = Plan.model_validate(record.definition)
    if missing:
        raise ApiError(
            404, "unknown_plan", f"no plan {', '.join(missing)} is loaded", plan_ids=missing
        )
    return plans


@router.post(
    "/enrollments",
    tags=["enrollments"],
    summary="Enrol users in plans (one, or many under `enrollments`)",
    status_code=201,
    response_model=Enrolled,
)
async def post_enrollments(
    request: Request,
    body: Annotated[EnrollmentBody, Body()],
    caller: Ingest,
    store: Store,
) -> Enrolled:
    items = body.enrollments if isinstance(body, EnrollmentBatch) else [body]
    plans = await _plans(request, {i.plan_id for i in items})
    now, prepared, problems, seen = _now(), [], [], set()
    for index, item in enumerate(items):
        key = (item.plan_id, item.openid)
        if key in seen:
            problems.append({"index": index, "field": "openid", "reason": "enrolled twice"})
            continue
        seen.add(key)
        try:
            prepared.append(
                prepare(plans[item.plan_id], item.openid, item.start, item.tz, item.variables, now)
            )
        except EnrolmentError as exc:
            problems.append({"index": index, "field": exc.field, "reason": exc.reason})
    if problems:
        raise ApiError(
            422,
            "invalid_enrollment",
            f"{len(problems)} enrolment(s) refused; nothing was stored",
            problems=problems,
        )
    await store.upsert_enrollments(prepared)
    return Enrolled(enrolled=len(prepared), enrollments=[_out(e) for e in prepared])


def _out(e: Enrolment) -> EnrollmentOut:
    return EnrollmentOut(
        plan_id=e.plan_id, openid=e.user_id, start=e.start_at, tz=e.tz, next_due_at=e.next_due_at
    )


@router.delete(
    "/enrollments/{plan_id}/{openid}",
    tags=["enrollments"],
    summary="Stop a user's enrolment (its history and ledger are kept)",
)
async def delete_enrollment(
    plan_id: Id, openid: OpenIdPath, caller: Ingest, request: Request
) -> dict[str, str]:
    # Through the lifecycle, the one writer of enrolment states: it writes the audit row.
    try:
        await lifecycle_of(request).stop_enrollment(
            plan_id, openid, actor=f"api:{caller.name}", reason="stopped through the ingest API"
        )
    except LifecycleError as exc:
        if exc.code == "unknown_enrollment":
            raise ApiError(
                404, "unknown_enrollment", f"{openid} is not enrolled in {plan_id}", plan_id=plan_id
            ) from None
        if exc.code != "invalid_transition":  # already stopped or finished: done already
            raise refused(exc) from None
    return {"plan_id": plan_id, "openid": openid, "status": "stopped"}


# --- opens --------------------------------------------------------------------------------------


class OpenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    openid: OpenId
    scene: Scene = Field(description="The launch scene: 1014 or 1107 (opened from a notification).")
    rmd: DeliveryId | None = Field(
        None,
        description=f"The `{TRACKING_PARAM}` query parameter of the launch options: the delivery "
        "the notification came from.",
    )
    at: Moment | None = Field(None, description="When it was opened (default: now).")


class OpensBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    opens: list[OpenIn] = Field(min_length=1, max_length=1000)


@router.post(
    "/opens",
    tags=["opens"],
    summary="Report opens of the mini program from a notification",
)
async def post_opens(batch: OpensBatch, caller: Ingest, store: Store) -> dict[str, int]:
    problems = [
        {"index": i, "field": "scene", "reason": f"{o.scene} is not 1014 or 1107"}
        for i, o in enumerate(batch.opens)
        if o.scene not in NOTIFICATION_SCENES
    ]
    deliveries = await store.deliveries_of([o.rmd for o in batch.opens if o.rmd])
    problems += [
        {"index": i, "field": "rmd", "reason": f"no delivery {o.rmd} was sent to {o.openid}"}
        for i, o in enumerate(batch.opens)
        if o.rmd and deliveries.get(o.rmd, ("",))[0] != o.openid
    ]
    if problems:
        raise ApiError(
            422,
            "invalid_open",
            f"{len(problems)} open(s) refused; nothing was stored",
            problems=sorted(problems, key=lambda p: p["index"]),
        )
    now = _now()
    source = f"api:{caller.name}"
    recorded, duplicates = await store.record_opens(
        [OpenReport(o.openid, o.scene, o.at or now, o.rmd, source) for o in batch.opens]
    )
    return {"recorded": recorded, "duplicates": duplicates}


# --- activity -----------------------------------------------------------------------------------


ActivityKind = Annotated[
    str,
    Field(min_length=1, max_length=64, examples=["training_done"]),
    StorableText,
]


class ActivityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    openid: OpenId
    at: Moment = Field(description="When the user did it, with a UTC offset.")
    kind: ActivityKind | None = Field(
        None, description="What the user did, your word for it (kept, not interpreted)."
    )
    event_id: Id = Field(
        description="Your id for this report: a retried report with the same id is stored once."
    )


class ActivityBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    activity: list[ActivityIn] = Field(min_length=1, max_length=1000)


def activity_store(request: Request) -> ActivityStore:
    activity: ActivityStore = request.app.state.store.activity
    return activity


@router.post(
    "/activity",
    tags=["activity"],
    summary="Report what users did in the mini program (read by plans' adapt rules)",
)
async def post_activity(
    batch: ActivityBatch,
    caller: Ingest,
    store: Annotated[ActivityStore, Depends(activity_store)],
) -> dict[str, int]:
    source = f"api:{caller.name}"
    recorded, duplicates = await store.record(
        [ActivityReport(a.openid, a.at, a.event_id, source, a.kind) for a in batch.activity]
    )
    return {"recorded": recorded, "duplicates": duplicates}


# --- the runway ---------------------------------------------------------------------------------


@router.get(
    "/plans/{plan_id}/runway",
    tags=["consent"],
    summary="How many upcoming steps each enrolment's consent covers",
)
async def get_runway(
    plan_id: Id,
    caller: Ingest,
    store: Store,
    limit: Annotated[int, Query(ge=0, le=10_000)] = 100,
) -> dict[str, Any]:
    report = await store.runway(plan_id, limit=limit)
    if report is None:
        raise ApiError(404, "unknown_plan", f"no plan {plan_id} is loaded", plan_ids=[plan_id])
    return report.as_json()
