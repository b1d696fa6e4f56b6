"""The strictness every recipe table shares: unknown keys are errors, a validated table is frozen, and
a flag is true or false only (never "no" or 0)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Strict

Flag = Annotated[bool, Strict()]  # true or false only: "no" or 0 is not a boolean


class StrictModel(BaseModel):
    """A recipe table: unknown keys are errors, and it is frozen once validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)
