"""The micro-batch ceiling every policy keeps, and its out-of-memory back-off."""

from __future__ import annotations

from typing import Any

from olm_cli.errors import CheckpointError


class MicroBatchLimit:
    """Upper bound on samples per forward/backward, lowered by halving on OOM.

    Halving (rather than decrementing) finds a fitting size in log2 steps, and the effective
    batch is untouched because accumulation absorbs the difference.
    """

    def __init__(self, cap: int) -> None:
        self.cap = max(1, cap)

    def fit(self, samples: int) -> int:
        """Micro-batch for a step of ``samples``: never above the cap or the step itself."""
        return max(1, min(self.cap, samples))

    def halve(self, current: int) -> bool:
        """Lower the cap to half of the micro-batch that just failed; False at 1."""
        if current <= 1:
            return False
        self.cap = max(1, current // 2)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"micro_cap": self.cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cap = int(state["micro_cap"])


def check_policy_name(expected: str, state: dict[str, Any]) -> None:
    """Fail loudly when a run resumes with a different batch policy than it saved."""
    found = state.get("name")
    if found != expected:
        raise CheckpointError(
            f"batch policy state was saved by {found!r} but the recipe asks for {expected!r}"
        )


def clamp(value: float, low: int, high: int) -> int:
    """Round to the nearest integer inside [low, high]."""
    return int(min(high, max(low, round(value))))
