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


class PlanException(Model):
    """Limits the policy grants one plan instead of the general ones (looser or stricter)."""

    reason: Text = Field(min_length=1, description="Why the exception was granted.")
    user_day: PositiveInt | None = None
    category_week: PositiveInt | None = None
    plan_day: PositiveInt | None = None
    plan_week: PositiveInt | None = None
    quiet_hours: QuietWindow | None = None


class Engagement(Model):
    """How the engagement figures are counted (docs/engagement.md)."""

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
