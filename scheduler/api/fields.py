"""The API's input types: every body field, path and query parameter is one of these, so what
PostgreSQL or Python cannot store is refused with 422 naming the field (docs/api.md, "Limits").

The checks themselves live in `scheduler.domain.storable`; this module turns them into pydantic
types (which also put the limits into the OpenAPI document).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated

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


# Text without NUL or lone surrogates; each text type below adds its lengths with a Field.
StorableText = AfterValidator(_storable_text)


MAX_ID = 128
MAX_REASON = 500
MAX_VARIABLES = 64
MAX_VARIABLE_NAME = 64
MAX_VARIABLE_TEXT = 1000
MAX_TEMPLATES_PER_POPUP = 20

# Written out rather than made by a function, so that mypy sees them as `str`. Id: plan,
# template, user and report ids.
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID), StorableText]
Reason = Annotated[
    str,
    Field(min_length=1, max_length=MAX_REASON, description="Why: kept in the audit log."),
    StorableText,
]
Note = Annotated[str, Field(min_length=0, max_length=MAX_REASON), StorableText]  # optional reason
TimeZoneName = Annotated[
    str, Field(min_length=1, max_length=64, examples=["Asia/Shanghai"]), StorableText
]
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
VariableName = Annotated[str, Field(min_length=1, max_length=MAX_VARIABLE_NAME), StorableText]
Variables = Annotated[dict[VariableName, VariableValue], Field(max_length=MAX_VARIABLES)]
