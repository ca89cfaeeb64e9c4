"""Base class for every recipe section: unknown keys are errors, values are validated on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. ``extra="forbid"`` turns a typo into an error with a did-you-mean hint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
