"""Consent accounting: what a user's history of choices allows us to send. Pure: no I/O.

The platform's rules (wechat-api.md §2, §5, §7; the mini-game subscription doc):

- one-time template: each `accept` adds one credit; credits accumulate and never expire; each send
  consumes one; a `reject` in the popup leaves earlier credits alone, but switching the template
  off in the settings page (a change event) clears them; a send answered 43101 means none are left.
- long-term template: `accept` allows repeated sends until a `reject` (popup or settings) or
  a 43101.
- `ban` (the platform blocked the template for this user) stops sends until a later `accept`.
- `filter` (a same-title duplicate dropped from the popup) changes nothing.

The current state is a fold of `apply` over the ordered history, so the cached state in the
database can always be recomputed and a dispute ("I never agreed") answered from the history.

An event whose template kind is unknown (a WeChat push for a template no plan declares) applies the
effects of both kinds: a template is one kind in reality, and the dispatcher reads only the field
of the kind its plan declares, so the other effect is inert.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from scheduler.domain.plan import ConsentKind


class Result(StrEnum):
    ACCEPT = "accept"
    REJECT = "reject"
    BAN = "ban"
    FILTER = "filter"
    # Recorded by the send pipeline, not by the user:
    CONSUME = "consume"  # a one-time credit taken by a claimed delivery
    REFUND = "refund"  # a failed send gives its credit back (WeChat did not use it)
    EXHAUSTED = "exhausted"  # WeChat answered 43101: the user has no consent left


USER_RESULTS = frozenset({Result.ACCEPT, Result.REJECT, Result.BAN, Result.FILTER})


class Via(StrEnum):
    POPUP = "popup"  # wx.requestSubscribeMessage (reported by the backend or pushed by WeChat)
    SETTINGS = "settings"  # the user switched the template off (subscribe_msg_change_event)
    SEND = "send"  # the send pipeline


@dataclass(frozen=True, slots=True)
class ConsentEvent:
    result: Result
    via: Via = Via.POPUP
    kind: ConsentKind | None = None
    # A second report of a popup choice already counted (the backend's and WeChat's reports of
    # the same tap): kept in the history, but it grants nothing more.
    corroborates: bool = False


@dataclass(frozen=True, slots=True)
class ConsentState:
    credits: int = 0
    long_term: bool = False
    banned: bool = False

    def allows(self, kind: ConsentKind) -> bool:
        """Whether one send of a template of this kind is allowed now."""
        if self.banned:
            return False
        return self.long_term if kind == ConsentKind.LONG_TERM else self.credits > 0


NONE = ConsentState()


@dataclass(frozen=True, slots=True)
class ConsentProblem:
    code: str  # unknown_template | kind_mismatch
    message: str


def consent_problem(
    known: Mapping[str, set[ConsentKind]], template_id: str, kind: ConsentKind
) -> ConsentProblem | None:
    """Why a popup result for `template_id` must not be recorded: no loaded plan uses the
    template, or its plans declare another consent kind (a typo would put credits on a template
    no plan sends). `known` is what the plans declare (ConsentStore.template_kinds). The one
    check behind `POST /v1/consent` and `reminders consent`."""
    if template_id not in known:
        listed = ", ".join(sorted(known)) or "none is loaded"
        return ConsentProblem(
            "unknown_template",
            f"no loaded plan uses template {template_id} (templates in use: {listed})",
        )
    if kind not in known[template_id]:
        declared = "/".join(sorted(k.value for k in known[template_id]))
        return ConsentProblem(
            "kind_mismatch", f"template {template_id} is {declared} in its plans, not {kind.value}"
        )
    return None


def _affects(kind: ConsentKind | None, which: ConsentKind) -> bool:
    return kind is None or kind == which


def apply(state: ConsentState, event: ConsentEvent) -> ConsentState:
    """The state after one event."""
    if event.corroborates:
        return state
    match event.result:
        case Result.ACCEPT:
            return ConsentState(
                credits=state.credits + (1 if _affects(event.kind, ConsentKind.ONE_TIME) else 0),
                long_term=state.long_term or _affects(event.kind, ConsentKind.LONG_TERM),
                banned=False,
            )
        case Result.REJECT if event.via == Via.SETTINGS:
            return replace(state, credits=0, long_term=False)
        case Result.REJECT:
            # A popup "no" for a one-time template only declines this one extra send.
            if _affects(event.kind, ConsentKind.LONG_TERM):
                return replace(state, long_term=False)
            return state
        case Result.BAN:
            return replace(state, banned=True)
        case Result.FILTER:
            return state
        case Result.CONSUME:
            return replace(state, credits=max(0, state.credits - 1))
        case Result.REFUND:
            return replace(state, credits=state.credits + 1)
        case Result.EXHAUSTED:
            return replace(state, credits=0, long_term=False)
    raise ValueError(f"unknown consent result {event.result!r}")  # pragma: no cover


def derive(events: Iterable[ConsentEvent], start: ConsentState = NONE) -> ConsentState:
    """The current state from the ordered history (oldest first)."""
    state = start
    for event in events:
        state = apply(state, event)
    return state


# --- the consent runway -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Runway:
    """How far one enrolment's consent carries it along its upcoming steps.

    `covered` is how many of the upcoming steps will be sent (None: all of them, however many);
    `dry_step`/`dry_at` name the first upcoming step that will be skipped for want of consent
    (None: none will).
    """

    covered: int | None
    dry_step: int | None
    dry_at: datetime | None

    @property
    def dry_next(self) -> bool:
        """The very next step will be skipped with `no_consent`."""
        return self.covered == 0 and self.dry_step is not None


def runway(
    state: ConsentState, kind: ConsentKind, upcoming: Iterator[tuple[int, datetime]]
) -> Runway:
    """Walk the enrolment's upcoming (step, due time) pairs, lazily: at most credits + 1 are read.

    Each one-time step consumes a credit; a long-term acceptance covers every step.
    """
    if not state.banned and kind == ConsentKind.LONG_TERM and state.long_term:
        return Runway(None, None, None)
    budget = 0 if state.banned or kind == ConsentKind.LONG_TERM else state.credits
    covered = 0
    for step, due_at in upcoming:
        if covered == budget:
            return Runway(covered, step, due_at)
        covered += 1
    return Runway(covered, None, None)
