"""The base of every config section: strict pydantic models whose unknown keys are errors that suggest the
nearest known key. Blocks, kinds of data and the training settings all declare their fields with it."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from kiln.registry import nearest


class StrictModel(BaseModel):
    """A config section: unknown keys are errors that suggest the nearest known key."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = [name for name, f in cls.model_fields.items()]
            known += [f.alias for f in cls.model_fields.values() if f.alias]
            for key in data:
                if key not in known:
                    guess = nearest(str(key), known)
                    hint = f"did you mean {guess!r}? " if guess else ""
                    raise PydanticCustomError(
                        "unknown_key",
                        "unknown key {key!r}; {hint}allowed keys: {allowed}",
                        {"key": str(key), "hint": hint, "allowed": ", ".join(sorted(known))},
                    )
        return data
