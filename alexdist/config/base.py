"""The base of every recipe section: unknown keys are errors (a typo is never silently ignored), and
assignments are validated (the launcher's values written back into a recipe are checked too)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
