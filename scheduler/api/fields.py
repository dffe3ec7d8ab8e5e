"""The API's input types: every body field, path and query parameter is one of these, so what
PostgreSQL or Python cannot store is refused with 422 naming the field (docs/api.md, "Limits").

The checks themselves live in `scheduler.domain.storable`; this module turns them into pydantic
types (which also put the limits into the OpenAPI document).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, Field

from scheduler.domain.storable import INT32_MAX, INT64_MAX, moment_problem, text_problem


def _storable_text(value: str) -> str:
    if problem := text_problem(value):
        raise ValueError(problem)
    return value


def _sane_moment(value: datetime) -> datetime:
    if problem := moment_problem(value):
        raise ValueError(problem)
    return value


def text(max_length: int, min_length: int = 0, **field: Any) -> Any:
    """Text of at most `max_length` characters, without NUL or lone surrogates."""
    return Annotated[
        str,
        Field(min_length=min_length, max_length=max_length, **field),
        AfterValidator(_storable_text),
    ]


MAX_ID = 128
MAX_REASON = 500
MAX_VARIABLES = 64
MAX_VARIABLE_NAME = 64
MAX_VARIABLE_TEXT = 1000
MAX_TEMPLATES_PER_POPUP = 20

Id = text(MAX_ID, 1)  # plan, template, user and report ids
Reason = text(MAX_REASON, 1, description="Why: kept in the audit log.")
Note = text(MAX_REASON)  # an optional reason
TimeZoneName = text(64, 1, examples=["Asia/Shanghai"])
Moment = Annotated[AwareDatetime, AfterValidator(_sane_moment)]
DeliveryId = Annotated[int, Field(ge=1, le=INT64_MAX)]
Scene = Annotated[int, Field(ge=0, le=INT32_MAX)]


def _variable(value: str | int | float) -> str | int | float:
    # One check for the union, so a refusal is one reason at the variable's name.
    if isinstance(value, str):
        if len(value) > MAX_VARIABLE_TEXT:
            raise ValueError(f"text is limited to {MAX_VARIABLE_TEXT} characters")
        return _storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if isinstance(value, int) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise ValueError("integers are limited to 64 bits")
    return value


VariableValue = Annotated[str | int | float, AfterValidator(_variable)]
Variables = Annotated[
    dict[text(MAX_VARIABLE_NAME, 1), VariableValue],  # type: ignore[valid-type]
    Field(max_length=MAX_VARIABLES),
]
