"""The policy: which categories may use long-term templates, the content rules, the frequency caps
and the quiet hours. Pure: no I/O (`scheduler.planfiles.load_policy` reads `plans/policy.yaml`).

Every field has a built-in default, so an empty or missing policy file means the defaults; a field
the file gives replaces its default, except the mappings keyed by category, which are merged with
the defaults entry by entry (give a category `null` to drop its default entry). `docs/rules.md`
explains each default and where it comes from.
"""

from __future__ import annotations

from datetime import time
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from scheduler.domain.plan import (
    _PLAN_ID,
    Cap,
    Category,
    Duration,
    DurationText,
    Model,
    Text,
    TimeOfDay,
)

# Promotions are off-topic in a long-term reminder (DESIGN.md, "Content must stay on the
# subscribed topic"). Whole words for Latin text, substrings for Chinese.
DEFAULT_PROMOTIONAL_WORDS = (
    "优惠",
    "促销",
    "折扣",
    "打折",
    "特价",
    "秒杀",
    "抢购",
    "大促",
    "清仓",
    "包邮",
    "满减",
    "领券",
    "优惠券",
    "红包",
    "返现",
    "免费领",
    "抽奖",
    "中奖",
    "sale",
    "discount",
    "coupon",
    "promotion",
    "promo code",
    "special offer",
    "limited time",
    "buy now",
    "free gift",
    "cashback",
    "lottery",
    "clearance",
)
# "not a diagnosis, for reference only": one of these must appear in a medical message.
DEFAULT_MEDICAL_DISCLAIMERS = (
    "仅供参考",
    "不作为诊断",
    "不构成诊断",
    "not a diagnosis",
    "for reference only",
)
# Finance messages never promise returns.
DEFAULT_FINANCE_CLAIMS = (
    "保本",
    "稳赚",
    "保收益",
    "保证收益",
    "零风险",
    "无风险",
    "guaranteed return",
    "guaranteed profit",
    "risk-free",
    "risk free",
)


def _merged_with(defaults: dict[Category, Any]) -> BeforeValidator:
    """A category mapping read from a file overrides the defaults one category at a time."""

    def merge(value: Any) -> Any:
        if not isinstance(value, dict):
            return value  # pydantic reports the wrong type
        merged = {**{str(k): v for k, v in defaults.items()}, **value}
        return {k: v for k, v in merged.items() if v is not None}

    return BeforeValidator(merge)


class QuietWindow(Model):
    """Local times of day when nothing is sent; `start` later than `end` spans midnight, and
    `start` equal to `end` means no quiet hours."""

    start: TimeOfDay
    end: TimeOfDay

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def _window(start: str, end: str) -> QuietWindow:
    return QuietWindow(start=time.fromisoformat(start), end=time.fromisoformat(end))


class QuietHours(Model):
    default: QuietWindow = Field(default_factory=lambda: _window("22:00", "08:00"))
    # Commuters need a transit alert before they leave home: transport opens at 06:00, when the
    # first trains run, instead of 08:00 (docs/rules.md).
    categories: Annotated[
        dict[Category, QuietWindow], _merged_with({Category.TRANSPORT: _window("22:00", "06:00")})
    ] = Field(default_factory=lambda: {Category.TRANSPORT: _window("22:00", "06:00")})

    def window_for(self, category: Category) -> QuietWindow:
        return self.categories.get(category, self.default)


class FrequencyLimit(Model):
    """A frequency-limited long-term kind: at most `sends` per `per` per value of the plan's
    `delivery.limit_key` (e.g. once a month per policy number)."""

    sends: Cap = 1
    per: Literal["day", "week", "month", "year"] = "month"

    def __str__(self) -> str:
        return f"{self.sends} per {self.per}"


_LIMITED = {Category.FINANCE: FrequencyLimit()}


class ContentRules(Model):
    promotional_words: list[Text] = Field(default_factory=lambda: list(DEFAULT_PROMOTIONAL_WORDS))
    extra_promotional_words: list[Text] = Field(
        default_factory=list, description="Added to promotional_words (keeps the defaults)."
    )
    promotional_scope: Literal["long_term", "all"] = "long_term"
    disclaimers: Annotated[
        dict[Category, list[Text]],
        _merged_with({Category.MEDICAL: list(DEFAULT_MEDICAL_DISCLAIMERS)}),
    ] = Field(default_factory=lambda: {Category.MEDICAL: list(DEFAULT_MEDICAL_DISCLAIMERS)})
    forbidden_claims: Annotated[
        dict[Category, list[Text]],
        _merged_with({Category.FINANCE: list(DEFAULT_FINANCE_CLAIMS)}),
    ] = Field(default_factory=lambda: {Category.FINANCE: list(DEFAULT_FINANCE_CLAIMS)})

    @field_validator("promotional_words", "extra_promotional_words")
    @classmethod
    def _no_blank_words(cls, words: list[str]) -> list[str]:
        if any(not w.strip() for w in words):
            raise ValueError("an empty word would match every message")
        return words

    @field_validator("disclaimers", "forbidden_claims")
    @classmethod
    def _no_blank_phrases(cls, rules: dict[Category, list[str]]) -> dict[Category, list[str]]:
        for category, phrases in rules.items():
            if any(not p.strip() for p in phrases):
                raise ValueError(f"{category.value}: an empty phrase would match every message")
        return rules

    @property
    def all_promotional_words(self) -> list[str]:
        return [*self.promotional_words, *self.extra_promotional_words]


_WEEKLY = {Category.MEDICAL: 2, Category.EDUCATION: 3}

PositiveInt = Cap  # the gate counts caps in SQL integers: bounded


class Caps(Model):
    user_day: PositiveInt = Field(2, description="Per user per local day, across all plans.")
    category_week: Annotated[dict[Category, PositiveInt], _merged_with(_WEEKLY)] = Field(
        default_factory=lambda: dict(_WEEKLY),
        description="Per user per category per local ISO week.",
    )
    # Categories without a ceiling in the guidance: as many as the daily cap allows (2 x 7).
    category_week_default: PositiveInt = Field(14, description="For categories not listed.")
    plan_day: PositiveInt | None = Field(None, description="Per user per plan per local day.")
    plan_week: PositiveInt | None = Field(None, description="Per user per plan per ISO week.")

    def category_week_for(self, category: Category) -> int:
        return self.category_week.get(category, self.category_week_default)


def _rate(value: Any) -> Any:
    """A rate as a fraction (0.05) or a percentage ("5%", "5 %")."""
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                return float(text[:-1].strip()) / 100
            except ValueError:
                raise ValueError(f"{value!r} is not a percentage, e.g. '5%' or 0.05") from None
    return value


# A fraction of the sends, 0 to 1; a file may also write it as a percentage ("5%").
Rate = Annotated[float, BeforeValidator(_rate), Field(ge=0, le=1, allow_inf_nan=False)]
Factor = Annotated[float, Field(ge=1, le=1000, allow_inf_nan=False)]


def _fixed_window(name: str, window: Duration | None) -> None:
    if window is None:
        return
    if window.unit == "month":
        raise ValueError(f"{name}: give it in hours, days or weeks: a month has no fixed length")
    if window.amount == 0:
        raise ValueError(f"{name}: a zero window counts nothing")


class GuardOverride(Model):
    """Guard thresholds one plan gets instead of the policy's (`exceptions.PLAN.engagement`):
    each field left out keeps the policy's value."""

    auto_pause: bool | None = None
    recent_window: DurationText | None = None
    baseline_window: DurationText | None = None
    min_sends: PositiveInt | None = None
    max_cancellation_rate: Rate | None = None
    spike_factor: Factor | None = None
    spike_margin: Rate | None = None
    baseline_min_sends: PositiveInt | None = None
    min_click_through: Rate | None = None
    click_through_min_sends: PositiveInt | None = None

    @model_validator(mode="after")
    def _windows(self) -> GuardOverride:
        _fixed_window("recent_window", self.recent_window)
        _fixed_window("baseline_window", self.baseline_window)
        return self


class Guard(Model):
    """The engagement guard's thresholds (docs/engagement.md, "The guard"): when a plan pauses
    itself on cancellations, and when a step's click-through is flagged."""

    auto_pause: bool = Field(
        True, description="Pause a plan on a cancellation rate over the limit or a spike."
    )
    recent_window: DurationText = Field(
        default_factory=lambda: Duration(amount=24, unit="hour"),
        description="The deliveries judged: those due this long before now.",
    )
    baseline_window: DurationText = Field(
        default_factory=lambda: Duration(amount=7, unit="day"),
        description="The plan's baseline: the deliveries due this long before the recent window.",
    )
    min_sends: PositiveInt = Field(
        200, description="The recent window is judged from this many sends on."
    )
    max_cancellation_rate: Rate = Field(
        0.05, description="Pause when more than this fraction of the recent sends was cancelled."
    )
    spike_factor: Factor = Field(
        3.0, description="A spike: the recent rate is at least this many times the baseline ..."
    )
    spike_margin: Rate = Field(
        0.02, description="... and at least this much (a fraction) above it."
    )
    baseline_min_sends: PositiveInt = Field(
        200, description="A baseline of fewer sends is no baseline (only the limit applies)."
    )
    min_click_through: Rate = Field(
        0.05, description="A step whose click-through is under this is flagged (0: never)."
    )
    click_through_min_sends: PositiveInt = Field(
        100, description="A step is flagged from this many sends on."
    )

    @model_validator(mode="after")
    def _windows(self) -> Guard:
        _fixed_window("recent_window", self.recent_window)
        _fixed_window("baseline_window", self.baseline_window)
        return self

    def with_override(self, override: GuardOverride | None) -> Guard:
        """These thresholds with a plan's override applied (validated again)."""
        if override is None:
            return self
        given = override.model_dump(exclude_none=True)
        if not given:
            return self
        return Guard.model_validate({**self.model_dump(), **given})


class PlanException(Model):
    """Limits the policy grants one plan instead of the general ones (looser or stricter)."""

    reason: Text = Field(min_length=1, description="Why the exception was granted.")
    user_day: PositiveInt | None = None
    category_week: PositiveInt | None = None
    plan_day: PositiveInt | None = None
    plan_week: PositiveInt | None = None
    quiet_hours: QuietWindow | None = None
    engagement: GuardOverride | None = Field(
        None, description="The engagement guard's thresholds for this plan."
    )


class Engagement(Guard):
    """How the engagement figures are counted, and the guard's thresholds (docs/engagement.md)."""

    # WeChat's events and the mini program's reports lag, and a user rarely cancels the moment a
    # message arrives: a cancellation up to this long after a delivery is that delivery's.
    attribution_window: DurationText = Field(
        default_factory=lambda: Duration(amount=72, unit="hour"),
        description="A cancellation is attributed to the user's last delivery of the template "
        "at most this long before it.",
    )

    @field_validator("attribution_window")
    @classmethod
    def _fixed_length(cls, window: Duration) -> Duration:
        if window.unit == "month":
            raise ValueError("give the window in hours, days or weeks: a month has no fixed length")
        if window.amount == 0:
            raise ValueError("a zero window attributes nothing")
        return window

    @property
    def guard(self) -> Guard:
        """The guard's thresholds alone (what a plan's override applies to)."""
        return Guard.model_validate(
            {k: v for k, v in self.model_dump().items() if k in Guard.model_fields}
        )


class Policy(Model):
    long_term_categories: list[Category] = Field(
        default_factory=lambda: [
            Category.GOVERNMENT,
            Category.MEDICAL,
            Category.TRANSPORT,
            Category.EDUCATION,
            Category.FINANCE,
        ],
        description="Categories that may use long-term templates.",
    )
    limited_long_term: Annotated[dict[Category, FrequencyLimit], _merged_with(_LIMITED)] = Field(
        default_factory=lambda: dict(_LIMITED),
        description="Categories whose long-term kind is frequency-limited per key value.",
    )
    content: ContentRules = Field(default_factory=ContentRules)
    caps: Caps = Field(default_factory=Caps)
    quiet_hours: QuietHours = Field(default_factory=QuietHours)
    exceptions: dict[str, PlanException] = Field(
        default_factory=dict, description="Plan id -> the limits granted to that plan."
    )
    engagement: Engagement = Field(default_factory=Engagement)

    def guard_for(self, plan_id: str) -> Guard:
        """The engagement guard's thresholds for one plan: the policy's, with the plan's
        exception (`exceptions.PLAN.engagement`) applied."""
        exception = self.exceptions.get(plan_id)
        return self.engagement.guard.with_override(exception.engagement if exception else None)

    @field_validator("exceptions")
    @classmethod
    def _plan_ids(cls, exceptions: dict[str, PlanException]) -> dict[str, PlanException]:
        for plan_id in exceptions:
            if not _PLAN_ID.match(plan_id):
                raise ValueError(f"{plan_id}: not a plan id")
        return exceptions

    @model_validator(mode="after")
    def _limited_kinds_are_long_term(self) -> Policy:
        for category in self.limited_long_term:
            if category not in self.long_term_categories:
                raise ValueError(
                    f"limited_long_term.{category.value}: {category.value} is not in "
                    "long_term_categories"
                )
        return self


DEFAULT_POLICY = Policy()
