"""The base of every config section: strict pydantic models whose unknown keys are errors that suggest the
nearest known key. Blocks, kinds of data and the training settings all declare their fields with it.

Values are taken as they are typed: `true` is not the number 1, `2.0` not the integer 2, `"3"` not a number,
and no number is infinite or NaN. (YAML gives numbers their type; see ``kiln.config.ConfigLoader``.) A pair
may also be written as a list (``Pair``), as YAML has no tuples.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, PositiveInt, Strict, model_validator
from pydantic_core import PydanticCustomError

from kiln.registry import nearest


T = TypeVar("T")
Pair = Annotated[tuple[T, T], Strict(False)]  # two values, from a YAML list
PositivePair = Pair[PositiveInt]


class StrictModel(BaseModel):
    """A config section: unknown keys are errors that suggest the nearest known key."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=(), strict=True, allow_inf_nan=False)

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
