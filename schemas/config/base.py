"""The base of every config section: an unknown key is an error naming it, and a loaded config is frozen."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """One ``[section]`` of the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
