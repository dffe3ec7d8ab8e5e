"""The consent accounting rules and the runway, as pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from scheduler.domain.consent import (
    NONE,
    ConsentEvent,
    ConsentState,
    Result,
    Via,
    apply,
    derive,
    runway,
)
from scheduler.domain.plan import ConsentKind

ONE, LONG = ConsentKind.ONE_TIME, ConsentKind.LONG_TERM


def ev(result: str, via: Via = Via.POPUP, kind: ConsentKind | None = ONE, **kw) -> ConsentEvent:
    return ConsentEvent(Result(result), via, kind, **kw)


def test_one_time_accepts_accumulate_and_sends_consume():
    state = derive([ev("accept"), ev("accept"), ev("accept"), ev("consume", Via.SEND)])
    assert state == ConsentState(credits=2)
    assert state.allows(ONE) and not state.allows(LONG)


def test_a_popup_reject_keeps_earlier_one_time_credits():
    assert derive([ev("accept"), ev("accept"), ev("reject")]).credits == 2


def test_a_settings_reject_clears_one_time_credits():
    # The mini-game doc's case 3: switching off clears the count; switching on again is not
    # an acceptance, so nothing can be sent until the user subscribes again.
    state = derive([ev("accept"), ev("accept"), ev("reject", Via.SETTINGS, None)])
    assert state == NONE and not state.allows(ONE)


def test_43101_zeroes_credits_and_long_term():
    assert derive([ev("accept"), ev("accept"), ev("exhausted", Via.SEND)]) == NONE
    assert derive([ev("accept", kind=LONG), ev("exhausted", Via.SEND, LONG)]) == NONE


def test_ban_blocks_until_a_later_accept():
    banned = derive([ev("accept"), ev("accept"), ev("ban")])
    assert banned.banned and banned.credits == 2 and not banned.allows(ONE)
    assert derive([ev("reject")], banned).banned  # a reject does not lift a ban
    lifted = apply(banned, ev("accept"))
    assert lifted == ConsentState(credits=3) and lifted.allows(ONE)


def test_filter_changes_nothing():
    state = ConsentState(credits=1, long_term=True)
    assert apply(state, ev("filter")) == state


def test_long_term_accept_allows_until_a_reject_from_popup_or_settings():
    on = derive([ev("accept", kind=LONG)])
    assert on.allows(LONG) and on.credits == 0
    assert not apply(on, ev("reject", kind=LONG)).allows(LONG)
    assert not apply(on, ev("reject", Via.SETTINGS, None)).allows(LONG)


def test_consume_never_goes_below_zero_and_refund_gives_back():
    assert apply(NONE, ev("consume", Via.SEND)).credits == 0
    assert derive([ev("accept"), ev("consume", Via.SEND), ev("refund", Via.SEND)]).credits == 1


def test_a_corroborating_report_grants_nothing():
    assert derive([ev("accept"), ev("accept", corroborates=True)]).credits == 1


def test_unknown_kind_applies_both_kinds_effects():
    state = apply(NONE, ev("accept", kind=None))
    assert state.allows(ONE) and state.allows(LONG)
    after = apply(state, ev("reject", kind=None))  # popup reject: long-term off, credit stays
    assert after.allows(ONE) and not after.allows(LONG)


T = datetime(2026, 3, 2, 1, tzinfo=UTC)


def steps(first: int, n: int):
    return iter([(first + i, T + timedelta(weeks=i)) for i in range(n)])


@pytest.mark.parametrize(
    ("credits", "n", "covered", "dry_step"),
    [(0, 3, 0, 4), (2, 3, 2, 6), (3, 3, 3, None), (5, 3, 3, None), (0, 0, 0, None)],
)
def test_runway_counts_the_steps_credits_cover(credits, n, covered, dry_step):
    way = runway(ConsentState(credits=credits), ONE, steps(4, n))
    assert (way.covered, way.dry_step) == (covered, dry_step)
    assert way.dry_next == (covered == 0 and dry_step is not None)


def test_runway_reads_only_what_it_needs():
    def endless():
        i = 0
        while True:
            i += 1
            yield i, T

    assert runway(ConsentState(credits=2), ONE, endless()).dry_step == 3


def test_runway_of_long_term_and_banned():
    assert runway(ConsentState(long_term=True), LONG, steps(1, 9)).covered is None
    assert runway(ConsentState(long_term=True, banned=True), LONG, steps(1, 9)).dry_next
    assert runway(ConsentState(credits=4, banned=True), ONE, steps(1, 9)).dry_next
