"""The base every plugin component class shares (`name`, `description`, `Options`), and the empty options."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    """Options of a component that takes none."""

    model_config = ConfigDict(extra="forbid")


class Component:
    """Common shape of every plugin component."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
