"""The plan file model: what a service team writes, validated. Pure: no I/O.

A plan says who gets what, when: a schedule (calendar, for the whole audience, or relative to
each user's enrolment), the WeChat template and its fields, the message per step, the service
category and the consent kind. `docs/plans.md` documents it; `docs/plan.schema.json` is generated
from these models.
"""

from __future__ import annotations

import re
import string
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)

from scheduler.domain.limits import (
    MAX_ADAPT_RULES,
    MAX_CAP,
    MAX_COUNT,
    MAX_DATES,
    MAX_DURATION_DAYS,
    MAX_DURATION_YEARS,
    MAX_EXTRA_STEPS,
    MAX_FORMAT_WIDTH,
    MAX_TEXT,
    MAX_TIMES_PER_DAY,
    MAX_VARIANT_WEIGHT,
    MAX_VARIANTS,
    MAX_YEAR,
    MAX_ZONE_NAME,
    MIN_YEAR,
)
from scheduler.domain.template_fields import KNOWN_TYPES, field_type


class Category(StrEnum):
    GOVERNMENT = "government"
    MEDICAL = "medical"
    TRANSPORT = "transport"
    EDUCATION = "education"
    FINANCE = "finance"
    COMMERCE = "commerce"
    CATERING = "catering"
    ENTERTAINMENT = "entertainment"
    OTHER = "other"


class ConsentKind(StrEnum):
    ONE_TIME = "one_time"
    LONG_TERM = "long_term"


_PLAN_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+)\s*([a-z]+?)s?\s*$")
_UNITS = {"second", "minute", "hour", "day", "week", "month"}
_MAX_AMOUNT = {
    "second": MAX_DURATION_DAYS * 86_400,
    "minute": MAX_DURATION_DAYS * 1_440,
    "hour": MAX_DURATION_DAYS * 24,
    "day": MAX_DURATION_DAYS,
    "week": MAX_DURATION_DAYS // 7,
    "month": MAX_DURATION_YEARS * 12,
}
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[str, ...] = get_args(Weekday)


class Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _storable(value: Any) -> Any:
    # The daemon keeps every plan's definition in PostgreSQL, whose text holds neither NUL nor a
    # lone surrogate (YAML's "\0" and "\ud800" escapes make them); WeChat would refuse them too.
    if isinstance(value, str) and (found := _UNSTORABLE.search(value)):
        what = "a NUL character" if found[0] == "\x00" else "a lone surrogate"
        raise ValueError(f"the text contains {what} ({found[0]!r}): remove it")
    return value


Text = Annotated[str, Field(max_length=MAX_TEXT), BeforeValidator(_storable)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
Cap = Annotated[int, Field(ge=1, le=MAX_CAP)]


# --- small value types --------------------------------------------------------------------------


class Duration(BaseModel):
    """`N unit`, e.g. `1 week`, `30 days`, `1 month`, `5 seconds`."""

    model_config = ConfigDict(frozen=True)
    amount: int = Field(ge=0)
    unit: Literal["second", "minute", "hour", "day", "week", "month"]

    @model_validator(mode="after")
    def _bounded(self) -> Duration:
        # Beyond this the date maths overflows (or the plan would outlive its readers).
        if self.amount > _MAX_AMOUNT[self.unit]:
            raise ValueError(
                f"a duration may be at most {MAX_DURATION_YEARS} years "
                f"({MAX_DURATION_DAYS:,} days or {MAX_DURATION_YEARS * 12:,} months)"
            )
        return self

    @property
    def is_calendar(self) -> bool:
        """Days and longer move along the local calendar (wall-clock time stays put across DST)."""
        return self.unit in ("day", "week", "month")

    def as_timedelta(self) -> timedelta:
        if self.unit == "month":
            raise ValueError("a month has no fixed length")
        return timedelta(**{f"{self.unit}s": self.amount})

    def __str__(self) -> str:
        return f"{self.amount} {self.unit}{'s' if self.amount != 1 else ''}"


def _parse_duration(value: Any) -> Any:
    if isinstance(value, Duration | dict):
        return value
    match = _DURATION.match(str(value).lower())
    if not match or match.group(2) not in _UNITS:
        raise ValueError(
            f"{value!r} is not a duration: write a number and a unit "
            "(seconds, minutes, hours, days, weeks or months), e.g. '1 week'"
        )
    digits = match.group(1)
    # over 18 digits is over the limit anyway: say so, not that Python cannot read the number
    amount = int(digits) if len(digits) <= 18 else 10**18
    return {"amount": amount, "unit": match.group(2)}


DurationText = Annotated[
    Duration,
    BeforeValidator(_parse_duration),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {"type": "string", "pattern": r"^\s*\d+\s*(second|minute|hour|day|week|month)s?\s*$"}
    ),
]


def _parse_time_of_day(value: Any) -> Any:
    if isinstance(value, time):
        parsed: time | None = value
    elif isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 19:30 as the sexagesimal number 1170
        parsed = time(value // 60, value % 60) if 0 <= value < 24 * 60 else None
    else:
        try:
            parsed = time.fromisoformat(str(value))
        except ValueError:
            parsed = None
    # A time with a UTC offset would be silently read as local time (the plan's or the user's zone)
    if parsed is None or parsed.tzinfo is not None:
        raise ValueError(f"{value!r} is not a time of day: write HH:MM, e.g. '07:30'")
    return parsed


_TIME_SCHEMA = {"type": "string", "pattern": r"^\d{2}:\d{2}(:\d{2})?$"}
# Lists of times may also be written as one time (`at: "09:00"`).
_TIMES_SCHEMA = {
    "anyOf": [
        _TIME_SCHEMA,
        {
            "type": "array",
            "items": _TIME_SCHEMA,
            "minItems": 1,
            "maxItems": MAX_TIMES_PER_DAY,
        },
    ]
}

TimeOfDay = Annotated[
    time,
    BeforeValidator(_parse_time_of_day),
    PlainSerializer(lambda t: t.strftime("%H:%M:%S" if t.second else "%H:%M"), return_type=str),
    WithJsonSchema(_TIME_SCHEMA),
]


def _check_zone(value: Any) -> Any:
    try:
        if not isinstance(value, str) or len(value) > MAX_ZONE_NAME:
            raise ValueError
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a path
        raise ValueError(
            f"{str(value)[:MAX_ZONE_NAME]!r} is not an IANA time zone, "
            "e.g. 'Asia/Shanghai' or 'America/New_York'"
        ) from None
    return str(value)


ZoneName = Annotated[str, BeforeValidator(_check_zone), Field(max_length=MAX_ZONE_NAME)]


_DATE_ONLY = re.compile(r"^\s*\d{4}-\d{2}-\d{2}\s*$")


def _date_or_datetime(value: Any) -> Any:
    # A bare date means a whole day ("end: 2026-03-10" includes the 10th). YAML reads it as a date,
    # but quoted, or read back from the stored JSON, it is text that `datetime` would take as
    # midnight: keep it a date.
    if isinstance(value, str) and _DATE_ONLY.match(value):
        return date.fromisoformat(value.strip())
    return value


def _sane_year(value: datetime | date) -> datetime | date:
    # Far from year 1 and 9999, where converting between zones overflows.
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"the year must be {MIN_YEAR} to {MAX_YEAR}")
    return value


LocalMoment = Annotated[
    datetime | date, BeforeValidator(_date_or_datetime), AfterValidator(_sane_year)
]


def _at_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


AtTimes = Annotated[
    list[TimeOfDay],
    BeforeValidator(_at_list),
    Field(min_length=1, max_length=MAX_TIMES_PER_DAY),
    WithJsonSchema(_TIMES_SCHEMA),
]


def _sorted_unique(times: list[time]) -> list[time]:
    return sorted(set(times))


# --- schedules ----------------------------------------------------------------------------------


class Weekly(Model):
    # Not `on`: YAML 1.1 reads a bare `on` key as the boolean true.
    days: Annotated[
        list[Weekday],
        BeforeValidator(_at_list),
        Field(min_length=1),
        WithJsonSchema(
            {
                "anyOf": [
                    {"enum": list(WEEKDAYS)},
                    {"type": "array", "items": {"enum": list(WEEKDAYS)}, "minItems": 1},
                ]
            }
        ),
    ]
    at: AtTimes

    @field_validator("days", mode="before")
    @classmethod
    def _lower_weekdays(cls, value: Any) -> Any:
        days = (str(v).lower()[:3] for v in (value if isinstance(value, list) else [value]))
        return list(dict.fromkeys(days))  # each day once, so at most seven


class Monthly(Model):
    day: int | Literal["last"] = Field(description="Day of the month (1-31) or 'last'.")
    at: AtTimes
    short_months: Literal["skip", "last_day"] = Field(
        "skip",
        description="A month without `day` (day 31 in April, 30 in February): no occurrence "
        "that month (skip), or one on its last day (last_day).",
    )

    @field_validator("day")
    @classmethod
    def _day_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 1 <= value <= 31:
            raise ValueError("day must be 1-31 or 'last'")
        return value


class Daily(Model):
    at: AtTimes


class Workdays(Model):
    at: AtTimes
    calendar: Literal["CN"] = Field(
        "CN", description="Whose official working days: CN, China's (holidays and 调休)."
    )


DateList = Annotated[list[date], Field(max_length=MAX_DATES)]


class Calendar(Model):
    """One timeline for the whole audience, in one time zone. Exactly one of the rule fields."""

    timezone: ZoneName = "Asia/Shanghai"
    weekly: Weekly | None = None
    monthly: Monthly | None = None
    daily: Daily | None = None
    weekdays: Daily | None = Field(None, description="Monday to Friday at the given times.")
    workdays: Workdays | None = Field(
        None,
        description="A country's official working days at the given times: Monday to Friday "
        "without its statutory holidays, plus the weekend days it works instead (调休).",
    )
    cron: Text | None = Field(None, description="A 5-field crontab expression, local time.")
    every: DurationText | None = Field(None, description="A fixed interval, e.g. '2 hours'.")
    start: LocalMoment | None = Field(
        None, description="First moment that may fire (local). Default: when the plan is loaded."
    )
    end: LocalMoment | None = Field(None, description="Last moment (a date means its end).")
    count: Count | None = Field(None, description="How many occurrences in all.")
    skip_holidays: Literal["CN"] | None = Field(
        None, description="Leave out the statutory holidays of this country's calendar (CN)."
    )
    except_dates: DateList = Field(
        default_factory=list, description="Local dates on which the plan does not fire."
    )
    extra_dates: DateList = Field(
        default_factory=list,
        description="Local dates on which it fires too, at the rule's times (not for cron/every).",
    )

    @model_validator(mode="after")
    def _exactly_one_rule(self) -> Calendar:
        rules = [
            n
            for n in ("weekly", "monthly", "daily", "weekdays", "workdays", "cron", "every")
            if getattr(self, n)
        ]
        if len(rules) != 1:
            raise ValueError(
                "give exactly one of weekly, monthly, daily, weekdays, workdays, cron or every"
                + (f" (found {', '.join(rules)})" if rules else "")
            )
        if self.extra_dates and (self.cron is not None or self.every is not None):
            raise ValueError("extra_dates needs a rule with 'at' times, not cron or every")
        if self.cron is not None:
            from scheduler.domain.schedule import check_crontab  # local import: avoids a cycle

            check_crontab(self.cron, self.timezone)
        if self.every is not None and (self.every.is_calendar or self.every.amount < 1):
            raise ValueError(
                "'every' takes seconds, minutes or hours (at least 1); "
                "for days, weeks or months use daily, weekly or monthly"
            )
        return self


class Relative(Model):
    """A timeline per user, counted from each enrolment's start, in the user's own time zone."""

    every: DurationText
    count: Count | None = Field(None, description="How many messages in all.")
    duration: DurationText | None = Field(
        None, description="Stop after this long from the start, e.g. '30 days'."
    )
    at: (
        Annotated[
            list[TimeOfDay], Field(max_length=MAX_TIMES_PER_DAY), WithJsonSchema(_TIMES_SCHEMA)
        ]
        | None
    ) = Field(
        None, description="Local times of day for each period; default: the enrolment's time."
    )
    first_after: DurationText | None = Field(
        None, description="Delay before the first period; default: one `every`."
    )

    @field_validator("at", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return None if value is None else _at_list(value)

    @model_validator(mode="after")
    def _bounded(self) -> Relative:
        if self.every.amount < 1:
            raise ValueError("'every' must be at least 1 of its unit")
        if self.count is None and self.duration is None:
            raise ValueError("a relative schedule needs a count or a duration, or it never ends")
        if self.at is not None and not self.every.is_calendar:
            raise ValueError("'at' needs 'every' in days, weeks or months")
        return self


class Schedule(Model):
    calendar: Calendar | None = None
    relative: Relative | None = None
    grace: DurationText = Field(
        default_factory=lambda: Duration(amount=1, unit="hour"),
        description="How late an occurrence may still be sent; later ones are recorded missed.",
    )

    @field_validator("grace")
    @classmethod
    def _fixed_length(cls, grace: Duration) -> Duration:
        # the daemon needs a timedelta (misfire grace time); a month has none
        if grace.unit == "month":
            raise ValueError("a month has no fixed length: write the grace in days, e.g. '30 days'")
        return grace

    @model_validator(mode="after")
    def _one_kind(self) -> Schedule:
        if (self.calendar is None) == (self.relative is None):
            raise ValueError("give exactly one of 'calendar' or 'relative'")
        return self


# --- template and message -----------------------------------------------------------------------


class Template(Model):
    id: Text = Field(min_length=1, description="The private template id (priTmplId).")
    fields: dict[Text, Text] = Field(
        min_length=1, description="Keyword key -> WeChat type, e.g. thing1: thing."
    )
    page: Text | None = Field(None, description="Mini program page the card opens, query allowed.")

    @field_validator("fields")
    @classmethod
    def _keys_match_types(cls, fields: dict[str, str]) -> dict[str, str]:
        for key, type_ in fields.items():
            if type_ not in KNOWN_TYPES:
                raise ValueError(f"{key}: unknown WeChat type {type_!r}")
            if field_type(key) != type_:
                raise ValueError(
                    f"{key}: WeChat keys are the type plus a number, so {key!r} "
                    f"cannot be of type {type_!r}"
                )
        if not 1 <= len(fields) <= 5:
            raise ValueError("a template has 1 to 5 keywords")
        return fields


BUILTIN_VARIABLES = ("step", "count", "date", "time", "plan_name", "user")


_VARIANT_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


class Variant(Model):
    """One wording of a step (or of every step): its share of the users and its fields."""

    weight: int = Field(
        ge=1,
        le=MAX_VARIANT_WEIGHT,
        strict=True,
        description="Its share of the users: weight / the total weight of the variants.",
    )
    fields: dict[Text, Text] = Field(
        default_factory=dict,
        description="Field key -> text, over the step's and the default's (none: them as is).",
    )


def _check_variants(variants: dict[str, Variant]) -> dict[str, Variant]:
    for name in variants:
        if name == "default":
            raise ValueError(
                "'default' is what reports call a message without variants: name it otherwise"
            )
        if not _VARIANT_NAME.match(name):
            raise ValueError(
                f"{name[:40]!r} is not a variant name: use 1-32 lowercase letters, digits, "
                "'-' or '_'"
            )
    if not 1 <= len(variants) <= MAX_VARIANTS:
        raise ValueError(f"give 1 to {MAX_VARIANTS} variants (found {len(variants)})")
    return variants


Variants = Annotated[
    dict[str, Variant],
    AfterValidator(_check_variants),
    Field(
        description="Variant name ([a-z0-9_-], up to 32) -> its weight and fields; each user "
        "gets one, stably (docs/plans.md).",
        json_schema_extra={
            "propertyNames": {"pattern": _VARIANT_NAME.pattern, "not": {"const": "default"}},
            "minProperties": 1,
            "maxProperties": MAX_VARIANTS,
        },
    ),
]


def _step_schema(schema: dict[str, Any]) -> None:
    # As written in a plan file: the step's field texts, and `variants` beside them.
    properties = schema.pop("properties")
    schema.pop("required", None)
    schema.pop("title", None)
    schema["properties"] = {"variants": properties["variants"]}
    schema["additionalProperties"] = properties["fields"]["additionalProperties"]


class Step(Model):
    """What differs at one step: field texts over the default, and maybe variants. A plan file
    writes the texts and `variants` side by side (`3: {thing2: "...", variants: {...}}`): no
    template key is called `variants` (keys are a WeChat type and a number)."""

    model_config = ConfigDict(json_schema_extra=_step_schema)

    fields: dict[Text, Text] = Field(default_factory=dict)
    variants: Variants | None = None

    @model_validator(mode="before")
    @classmethod
    def _side_by_side(cls, value: Any) -> Any:
        if isinstance(value, Step) or not isinstance(value, dict):
            return value
        out: dict[str, Any] = {"fields": {k: v for k, v in value.items() if k != "variants"}}
        if "variants" in value:
            out["variants"] = value["variants"]
        return out

    @model_serializer(mode="wrap")
    def _flat(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        out: dict[str, Any] = dict(data["fields"])
        if self.variants is not None:
            out["variants"] = data["variants"]
        return out


_EXTRA_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


def _extra_name(value: str) -> str:
    if not _EXTRA_NAME.match(value):
        raise ValueError(
            f"{value[:40]!r}: an extra step's name is 1-32 lowercase letters, digits, '-' or '_', "
            "starting with a letter"
        )
    return value


ExtraName = Annotated[
    str,
    AfterValidator(_extra_name),
    WithJsonSchema({"type": "string", "pattern": _EXTRA_NAME.pattern}),
]


class Message(Model):
    default: dict[Text, Text] = Field(description="Field key -> text, with {variables}.")
    steps: dict[int, Step] = Field(
        default_factory=dict,
        description="Step number (from 1) -> fields that differ at that step, and its variants.",
    )
    variants: Variants | None = Field(
        None,
        description="Variants of every step without variants of its own; a user keeps one "
        "variant at every such step.",
    )

    extra: dict[ExtraName, dict[Text, Text]] = Field(
        default_factory=dict,
        max_length=MAX_EXTRA_STEPS,
        description="Named extra steps an `adapt` rule sends (`send: NAME`) -> the fields that "
        "differ from `default`.",
    )

    @model_serializer(mode="wrap")
    def _without_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A plan without variants dumps as before variants existed: its content hash (and so
        # its version) stays the same.
        data: dict[str, Any] = handler(self)
        if self.variants is None:
            data.pop("variants", None)
        return data

    def step_fields(self, step: int) -> dict[str, str]:
        """The texts `step` writes itself (over the default)."""
        own = self.steps.get(step)
        return own.fields if own is not None else {}

    def variants_of(self, step: int) -> tuple[str, dict[str, Variant]] | None:
        """The variants `step` uses, with their assignment scope (the step number, or
        `default` for the message-wide ones); None: the step has one content."""
        own = self.steps.get(step)
        if own is not None and own.variants is not None:
            return str(step), own.variants
        if self.variants is not None:
            return "default", self.variants
        return None

    def texts(
        self, step: int, variant: str | None = None, *, extra: str | None = None
    ) -> dict[str, str]:
        """The texts of `step` (in `variant`): the variant's over the step's over the default;
        or, given `extra`, that extra step's over the default."""
        if extra is not None:
            return {**self.default, **self.extra[extra]}
        texts = {**self.default, **self.step_fields(step)}
        if variant is not None:
            found = self.variants_of(step)
            if found is None or variant not in found[1]:
                raise KeyError(f"step {step} has no variant {variant!r}")
            texts.update(found[1][variant].fields)
        return texts

    def path_of(
        self, step: int, key: str, variant: str | None = None, *, extra: str | None = None
    ) -> str:
        """Where the text of `key` at `step` (in `variant`, or in the extra step) is written in
        the plan file."""
        if extra is not None:
            own = key in self.extra[extra]
            return f"message.extra.{extra}.{key}" if own else f"message.default.{key}"
        if variant is not None and (found := self.variants_of(step)) is not None:
            if key in found[1][variant].fields:
                base = "message" if found[0] == "default" else f"message.steps.{step}"
                return f"{base}.variants.{variant}.fields.{key}"
        if key in self.step_fields(step):
            return f"message.steps.{step}.{key}"
        return f"message.default.{key}"


# --- adapt: each user's timeline follows what the user did (docs/plans.md#adapt) --------------


def _activity_window(value: Duration) -> Duration:
    if value.unit == "month":
        raise ValueError("a month has no fixed length: write it in days, e.g. '30 days'")
    if value.amount < 1:
        raise ValueError("the window must be at least 1 of its unit")
    return value


ActivityWindow = Annotated[DurationText, AfterValidator(_activity_window)]


class AdaptIf(Model):
    """What the user did, as of the moment the step is judged. Several conditions: all hold."""

    inactive_for: ActivityWindow | None = Field(
        None,
        description="Nothing reported of the user (no open, no activity) for at least this "
        "long; a user of whom nothing was ever reported does not match.",
    )
    active_within: ActivityWindow | None = Field(
        None, description="The user opened the mini program or was reported active this recently."
    )
    opened_within: ActivityWindow | None = Field(
        None, description="The user opened the mini program (POST /v1/opens) this recently."
    )

    @model_validator(mode="after")
    def _some_condition(self) -> AdaptIf:
        if self.inactive_for is None and self.active_within is None and self.opened_within is None:
            raise ValueError("give inactive_for, active_within or opened_within")
        return self


class AdaptRule(Model):
    """One rule: the first whose `if` matches a due user decides that user's step."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        validate_by_name=False,  # a plan file says `if`; stored definitions too (by alias)
        validate_by_alias=True,
        serialize_by_alias=True,
    )
    when: AdaptIf = Field(alias="if", description="The condition (all of its fields hold).")
    send: ExtraName | None = Field(
        None,
        description="Also send this extra step (message.extra.NAME), at most once per "
        "inactivity period, through the whole gate.",
    )
    skip: bool = Field(False, description="Skip the plan's step for this user (reason adapted).")

    @model_validator(mode="after")
    def _some_action(self) -> AdaptRule:
        if self.send is None and not self.skip:
            raise ValueError("give what the rule does: send: NAME, skip: true, or both")
        return self


# --- delivery: what the policy rules do with this plan's messages (docs/rules.md) ---------------


class PlanCaps(Model):
    """This plan's own frequency caps: stricter than the policy's, never looser (unless the
    policy grants the plan an exception)."""

    user_day: Cap | None = Field(
        None, description="Messages a user may get per local day, all plans together."
    )
    category_week: Cap | None = Field(
        None, description="Messages a user may get per local ISO week in this category."
    )
    plan_day: Cap | None = Field(None, description="This plan's messages per user per day.")
    plan_week: Cap | None = Field(
        None, description="This plan's messages per user per local ISO week."
    )


class Delivery(Model):
    on_quiet_hours: Literal["defer", "skip"] = Field(
        "defer", description="A message due in quiet hours: defer it to their end, or skip it."
    )
    on_capped: Literal["skip", "defer"] = Field(
        "skip", description="A message over a frequency cap: skip it, or defer it to the reset."
    )
    max_delay: DurationText = Field(
        default_factory=lambda: Duration(amount=12, unit="hour"),
        description="How long after its due time a deferred message may still be sent.",
    )
    caps: PlanCaps = Field(default_factory=PlanCaps)
    resend_unknown: bool = Field(
        False,
        description="A send that may have reached WeChat without an answer (a lost reply, a "
        "crash mid-send) is sent again, within the grace window. Off by default: WeChat has no "
        "idempotency key, so the user may get the message twice.",
    )
    priority: Literal["high", "normal", "low"] = Field(
        "normal",
        description="Who goes first when WeChat's daily quota runs short: a low-priority plan "
        "holds its sends back while the quota left is within REMINDERS_QUOTA_RESERVE_LOW of the "
        "daily limit, a normal one within REMINDERS_QUOTA_RESERVE_NORMAL, a high one only once "
        "it is spent (held back: deferred to the reset, or skipped past max_delay; reason quota).",
    )
    limit_key: Text | None = Field(
        None,
        description="A variable or template field whose value a frequency-limited long-term "
        "kind counts per (finance: e.g. the policy number).",
    )

    @field_validator("max_delay")
    @classmethod
    def _fixed_delay(cls, delay: Duration) -> Duration:
        if delay.unit == "month":
            raise ValueError("a month has no fixed length: write the delay in days, e.g. '3 days'")
        if delay.amount < 1:
            raise ValueError("max_delay must be at least 1 of its unit")
        return delay


def _id_optional_in_files(schema: dict[str, Any]) -> None:
    # The loader fills a missing id from the file name, so a plan file may leave it out.
    schema["required"] = [name for name in schema.get("required", []) if name != "id"]


class Plan(Model):
    model_config = ConfigDict(json_schema_extra=_id_optional_in_files)

    id: str = Field(
        description="Stable id: lowercase letters, digits, '-' and '_'. "
        "Default in a plan file: the file name without its extension."
    )
    name: Text = Field(min_length=1)
    description: Text | None = None
    category: Category
    consent: ConsentKind
    schedule: Schedule
    template: Template
    message: Message
    variables: list[Text] = Field(
        default_factory=list, description="Per-user variables every enrolment must supply."
    )
    delivery: Delivery = Field(
        default_factory=Delivery,
        description="Quiet hours and caps: skip or defer, the plan's own caps (docs/rules.md).",
    )
    adapt: list[AdaptRule] = Field(
        default_factory=list,
        max_length=MAX_ADAPT_RULES,
        description="Rules that skip a step or send an extra one, from what "
        "each user did (opens, reported activity); the first that matches decides.",
    )

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _PLAN_ID.match(value):
            raise ValueError(
                f"{value!r}: use 1-64 lowercase letters, digits, '-' or '_', starting alphanumeric"
            )
        return value

    @model_validator(mode="after")
    def _message_fits_template(self) -> Plan:
        keys = set(self.template.fields)
        allowed_vars = set(BUILTIN_VARIABLES) | set(self.variables)
        missing = keys - set(self.message.default)
        if missing:
            names = ", ".join(sorted(missing))
            raise ValueError(f"message.default: missing template fields: {names}")
        count = self.occurrence_limit
        for where, fields in self._message_texts():
            extra = set(fields) - keys
            if extra:
                raise ValueError(
                    f"message.{where}: not template fields: {', '.join(sorted(extra))}"
                )
            for key, text in fields.items():
                for name in placeholders(text, f"message.{where}.{key}"):
                    if name not in allowed_vars:
                        raise ValueError(
                            f"message.{where}.{key}: unknown variable {{{name}}}; declare it "
                            f"under 'variables' or use one of {', '.join(BUILTIN_VARIABLES)}"
                        )
        for step in self.message.steps:
            if step < 1 or (count is not None and step > count):
                runs = f"steps run 1..{count}" if count is not None else "steps start at 1"
                raise ValueError(f"message.steps.{step}: no such step ({runs})")
        for index, rule in enumerate(self.adapt):
            if rule.send is not None and rule.send not in self.message.extra:
                named = ", ".join(sorted(self.message.extra)) or "none"
                raise ValueError(
                    f"adapt.{index}.send: no extra step {rule.send!r} under message.extra "
                    f"(there: {named})"
                )
        limit_key = self.delivery.limit_key
        if limit_key is not None and limit_key not in self.variables and limit_key not in keys:
            raise ValueError(
                f"delivery.limit_key: {limit_key!r} is neither one of the plan's variables "
                "nor a template field"
            )
        return self

    def _message_texts(self) -> list[tuple[str, dict[str, str]]]:
        """Every set of field texts of the message, with where it is written (under message)."""
        found = [("default", self.message.default)]
        found += [
            (f"variants.{n}.fields", v.fields) for n, v in (self.message.variants or {}).items()
        ]
        for step, own in self.message.steps.items():
            found.append((f"steps.{step}", own.fields))
            found += [
                (f"steps.{step}.variants.{n}.fields", v.fields)
                for n, v in (own.variants or {}).items()
            ]
        found += [(f"extra.{name}", fields) for name, fields in self.message.extra.items()]
        return found

    @property
    def occurrence_limit(self) -> int | None:
        rule = self.schedule.calendar or self.schedule.relative
        return rule.count if rule else None

    @property
    def is_relative(self) -> bool:
        return self.schedule.relative is not None


# What a message needs from Python's format mini-language ({step:02d}, {count:>3}): fill, align,
# sign, zero padding, a width and precision of at most MAX_FORMAT_WIDTH, a type. No nested fields,
# no conversions: nothing a user's value could turn into a huge string.
_FORMAT_SPEC = re.compile(
    r"(?:[^{}]?[<>=^])?[-+ ]?#?0?(?P<width>\d+)?[,_]?(?:\.(?P<precision>\d+))?[bcdeEfFgGnosxX%]?",
    re.DOTALL,
)


def _check_spec(name: str, spec: str, conversion: str | None) -> str | None:
    if conversion is not None:
        return f"{{{name}!{conversion}}}: conversions (!r, !s, !a) are not supported"
    if not spec:
        return None
    match = _FORMAT_SPEC.fullmatch(spec)
    if match is None:
        return f"{{{name}:{spec}}}: not a format spec a message can use, e.g. {{{name}:02d}}"
    for part in ("width", "precision"):
        if match[part] is not None and int(match[part]) > MAX_FORMAT_WIDTH:
            return f"{{{name}:{spec}}}: the {part} may be at most {MAX_FORMAT_WIDTH}"
    return None


def placeholders(text: str, where: str = "text") -> list[str]:
    """The `{names}` a message text uses; raises ValueError on broken braces and on format specs a
    message cannot need (`docs/plans.md`: at most a width and precision of MAX_FORMAT_WIDTH)."""
    try:
        parsed = [(n, s, c) for _, n, s, c in string.Formatter().parse(text) if n is not None]
    except ValueError as exc:
        raise ValueError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for name, spec, conversion in parsed:
        if (problem := _check_spec(name, spec or "", conversion)) is not None:
            raise ValueError(f"{where}: {problem}")
    return [name for name, _, _ in parsed]
