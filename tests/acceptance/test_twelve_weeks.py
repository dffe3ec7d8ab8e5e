"""Issue 4's end-to-end run: the example plans over 12 virtual weeks through the real dispatcher,
gate and PostgreSQL ledger (bench/twelve_weeks.py), with the ledger's outcome per rule checked
exactly and the invariants every run must keep.

The calendar from 2026-12-01 00:00 to 2027-02-23 00:00 (Asia/Shanghai; "SH" below):
- commute-line2: weekdays 07:30 SH, 60 occurrences (12 weeks x 5).
- practice-30days: 08:00 and 20:00 SH, Dec 1-30: 60 occurrences; December has 22 weekdays
  (Dec 1-30) and 8 weekend days.
- course-fridays: Fridays 19:00 SH, Dec 4 - Jan 22: 8 (4 in December, 4 in January).
- pension-monthly: the 5th at 09:00 SH: Dec 5 (a Saturday), Jan 5, Feb 5.
- rehab-weekly: each patient's week 1-12 at 09:00 in their own zone (all inside the 12 weeks).
Caps: 2 per user per local day across plans; per-category weekly caps the schedules never reach.
Quiet hours 22:00-08:00 (transport 22:00-06:00) in the user's zone: deferred to their end.
At one virtual moment the run retries due deferrals first (plans in id order), then fires.
"""

from __future__ import annotations

from collections import Counter
from zoneinfo import ZoneInfo

from bench.twelve_weeks import AUDIENCE, run_scenario

SENT = ("sent", None)
CAPPED = ("skipped", "capped")
NO_CONSENT = ("skipped", "no_consent")
OPTED_OUT = ("skipped", "opted_out")
CONTENT = ("skipped", "content")
FIELD = ("skipped", "field")
DEFERRED = ("deferred", "quiet_hours")

# (user, plan) -> final ledger outcome -> rows.
EXPECTED_BY_USER = {
    # alice, Shanghai: commute 07:30 is always the day's first send.
    ("o-alice", "commute-line2"): {SENT: 60},
    # December weekdays: commute and practice 08:00 fill the day, so practice 20:00 is capped on
    # all 22; on the 8 weekend days both check-ins go: 22 + 16 sent.
    ("o-alice", "practice-30days"): {SENT: 38, CAPPED: 22},
    # alice is in 3 plans on Fridays: the December Fridays (4) are capped at 19:00 (commute and
    # practice 08:00 went); from Jan 1 practice is over and commute + course make 2: sent.
    ("o-alice", "course-fridays"): {CAPPED: 4, SENT: 4},
    # bob, New York (SH - 13 h): commute 07:30 SH is 18:30 the day before, outside quiet hours.
    ("o-bob", "commute-line2"): {SENT: 60},
    # practice 20:00 SH is 07:00 local: deferred to 08:00, the local day's first send: 30
    # deferred, 30 sent (the last, Dec 30, after the plan completed: see below). practice
    # 08:00 SH is 19:00 local the day before, after that day's deferred check-in and (SH
    # weekdays) the 18:30 commute, or (SH Saturdays) the course deferred to 08:00 Friday:
    # capped 25 times; it goes on Dec 1 (nothing deferred on Nov 30 local) and the 4 SH
    # Sundays: 5 sent.
    ("o-bob", "practice-30days"): {SENT: 35, CAPPED: 25},
    # course 19:00 SH is 06:00 local: deferred to 08:00, sent (with practice, course first by
    # plan id) all 8 times.
    ("o-bob", "course-fridays"): {SENT: 8},
    # carol, London (SH - 8 h): commute 07:30 SH is 23:30 the day before, in transport quiet
    # hours: deferred to 06:00 and sent, all 60.
    ("o-carol", "commute-line2"): {SENT: 60},
    # practice 08:00 SH is 00:00 local: deferred to 08:00, sent all 30 (the day's second at
    # most). practice 20:00 SH is 12:00 local, the day's third on the 22 weekdays (commute at
    # 06:00, check-in at 08:00) and on Dec 5 (pension deferred to 08:00 too): 23 capped, 7 sent.
    ("o-carol", "practice-30days"): {SENT: 37, CAPPED: 23},
    # pension 09:00 SH is 01:00 local: deferred to 08:00 and sent, 3 times.
    ("o-carol", "pension-monthly"): {SENT: 3},
    # dave, Shanghai, 10 practice credits: practice 08:00 goes Dec 1-8 plus 20:00 on the weekend
    # of Dec 5-6 (10 credits); 20:00 is capped on the weekdays Dec 1-4 and 7 while credits last
    # (a capped send takes no credit), then every check-in is no_consent: 60 - 10 - 5 = 45.
    ("o-dave", "commute-line2"): {SENT: 60},
    ("o-dave", "practice-30days"): {SENT: 10, CAPPED: 5, NO_CONSENT: 45},
    # rehab on Mondays 09:00 from Dec 7: capped on Dec 7 (commute and practice 08:00 went), then
    # the 4 credits go on Dec 14, 21, 28 and Jan 4 (practice is out of credits by then); the
    # other 7 weeks are no_consent.
    ("o-dave", "rehab-weekly"): {CAPPED: 1, SENT: 4, NO_CONSENT: 7},
    # erin: her 21-character patient name breaks thing1's 20-character rule: all 12 weeks
    # skipped by the field rule (and no credit taken).
    ("o-erin", "rehab-weekly"): {FIELD: 12},
    ("o-erin", "pension-monthly"): {SENT: 3},
    # frank: promotional words in his pension name: the content rule skips all 3 notices.
    ("o-frank", "pension-monthly"): {CONTENT: 3},
    ("o-frank", "commute-line2"): {SENT: 60},
    # grace opts out of every plan on Dec 24 12:00 SH: the 18 commute weekdays Dec 1-24, the
    # Fridays Dec 4, 11, 18 and the Dec 5 pension went; everything after is opted_out.
    ("o-grace", "commute-line2"): {SENT: 18, OPTED_OUT: 42},
    ("o-grace", "course-fridays"): {SENT: 3, OPTED_OUT: 5},
    ("o-grace", "pension-monthly"): {SENT: 1, OPTED_OUT: 2},
    # heidi, New York: rehab at 09:00 in her own zone, 12 weeks, 12 credits: all sent; never
    # accepted the course's long-term template: no_consent all 8 Fridays; pension 09:00 SH is
    # 20:00 local the day before: sent.
    ("o-heidi", "rehab-weekly"): {SENT: 12},
    ("o-heidi", "course-fridays"): {NO_CONSENT: 8},
    ("o-heidi", "pension-monthly"): {SENT: 3},
}

# The per-rule outcome counts of the run, per plan (the sums of the table above).
EXPECTED = {
    "commute-line2": {SENT: 318, OPTED_OUT: 42},
    "course-fridays": {SENT: 15, CAPPED: 4, NO_CONSENT: 8, OPTED_OUT: 5},
    "pension-monthly": {SENT: 10, CONTENT: 3, OPTED_OUT: 2},
    "practice-30days": {SENT: 120, CAPPED: 75, NO_CONSENT: 45},
    "rehab-weekly": {SENT: 16, CAPPED: 1, NO_CONSENT: 7, FIELD: 12},
}

# What became of the rows that were deferred (all by quiet hours): carol's 60 commutes, 30
# check-ins and 3 pension notices, bob's 30 check-ins and 8 lessons went out.
EXPECTED_DEFERRED_FATE = {
    "commute-line2": {SENT: 60},
    "course-fridays": {SENT: 8},
    "pension-monthly": {SENT: 3},
    "practice-30days": {SENT: 60},
}

# A calendar plan completes with its last occurrence; the sends of that occurrence deferred past
# it still go (bob's last check-in, Dec 30 20:00 SH = 07:00 New York, and last lesson, Jan 22
# 19:00 SH = 06:00 New York, both sent at 08:00 his time).


async def test_twelve_weeks_of_the_example_plans(db_url: str) -> None:
    report = await run_scenario(db_url)

    assert {k: dict(v) for k, v in report.by_user.items()} == EXPECTED_BY_USER
    assert {k: dict(v) for k, v in report.counts.items()} == EXPECTED
    assert {k: dict(v) for k, v in report.deferred_fate.items()} == EXPECTED_DEFERRED_FATE
    total = report.total()
    assert total[SENT] == 479
    assert report.deferred_then("sent") == 131

    # Nothing in flight or still deferred after the last retry.
    assert report.left == []

    # Every row that was not sent says which rule stopped it.
    assert all(reason is not None for status, reason in total if status != "sent")

    # The fake WeChat accepted exactly the ledger's sends, and (counted by the virtual time of
    # each send in the user's own zone) no user ever got more than 2 on one local day.
    assert len(report.sends) == total[SENT]
    zones = {u.id: ZoneInfo(u.tz) for u in AUDIENCE}
    per_day = Counter((user, at.astimezone(zones[user]).date()) for user, _, at in report.sends)
    assert max(per_day.values()) == 2
    assert report.most_per_local_day() == 2
