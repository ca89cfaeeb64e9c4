"""Guard against loading one selector's checkpointed state into another."""

from __future__ import annotations

from typing import Any

from olm_cli.errors import CheckpointError


def check_state_name(expected: str, state: dict[str, Any]) -> None:
    """Fail loudly when a run resumes with a different selector than it saved."""
    found = state.get("name")
    if found != expected:
        raise CheckpointError(
            f"selector state was saved by {found!r} but the recipe asks for {expected!r}"
        )
