"""Content variants: which of a step's weighted variants a user gets. Pure.

A user's variant is a function of the plan id, the step (or `default` for the message-wide
variants, so a user keeps one of those at every step) and the user id alone: SHA-256 of the three,
its first 8 bytes as an integer modulo the total weight, then the weights walked in name order.
Every replica, every restart and `reminders preview` agree on it without storing anything, and
no Python `hash()` (salted per process) is involved. docs/plans.md shows the syntax.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

WHOLE_MESSAGE = "default"  # the scope of the message-wide variants (message.variants)


def bucket(plan_id: str, scope: str, user_id: str, total: int) -> int:
    """The user's point in [0, total): the same for the same three, in any process."""
    if total < 1:
        raise ValueError("the total weight must be at least 1")
    key = "\x1f".join((plan_id, scope, user_id)).encode("utf-8", "surrogatepass")
    # 2**64 over a total weight of at most 10,000: the modulo's bias is under 1e-15.
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % total


def choose(weights: Mapping[str, int], plan_id: str, scope: str, user_id: str) -> str:
    """The variant (a key of `weights`, name -> positive weight) the user gets in `scope`:
    each with a probability of its weight over the total, stable across calls and processes."""
    if not weights or any(w < 1 for w in weights.values()):
        raise ValueError("variants need positive weights")
    point = bucket(plan_id, scope, user_id, sum(weights.values()))
    for name in sorted(weights):
        if point < weights[name]:
            return name
        point -= weights[name]
    raise AssertionError("unreachable: the point is under the total weight")
