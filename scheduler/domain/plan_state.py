"""A plan's state, and the one place that says what each state lets the daemon do.

The SQL of the send path (the claim, the chunk queue) takes the sending states from here as a
parameter or, inside the claim function, spells them out; tests/integration/test_gate_claim.py
checks the claim against `PlanState.sends` for every state.
"""

from __future__ import annotations

from enum import StrEnum


class PlanState(StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    CANCELLED = "cancelled"  # final
    COMPLETED = "completed"  # every occurrence is due; final

    @property
    def fires(self) -> bool:
        """New occurrences and relative steps start only in an active plan."""
        return self is PlanState.ACTIVE

    @property
    def sends(self) -> bool:
        """Work already due still goes out: a completed plan's last occurrence finishes its
        fan-out and its deferred sends."""
        return self in (PlanState.ACTIVE, PlanState.COMPLETED)


SENDING_STATES = [s.value for s in PlanState if s.sends]
