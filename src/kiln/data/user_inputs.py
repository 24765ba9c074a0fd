"""Served recommendation requests: ``{"user": id, "top": k}``, answered with the user's k best items that the user
has not interacted with. The user is checked here against the run's users, so answering never fails on a request."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from kiln.data.requests import objects
from kiln.errors import InputError, KilnError

MAX_ID_CHARS = 256


class UserInputs:
    kind = "user"
    accepts_files = False

    def __init__(self, user_code: Callable[[Any], int], users: int, max_top: int) -> None:
        self.user_code, self.users, self.max_top = user_code, users, max_top
        user_id = Annotated[str, Strict(), Field(min_length=1, max_length=MAX_ID_CHARS)] | Annotated[int, Strict()]
        self._model = create_model(
            "UserInstance", __config__=ConfigDict(extra="forbid"),
            user=(user_id, Field(description="a user id of the training data (text or integer)")),
            top=(Annotated[int, Strict()], Field(10, ge=1, le=max_top, description="how many items to answer")))

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        for i, inst in enumerate(instances):
            try:
                self.user_code(inst.user)
            except KilnError as e:
                raise InputError(f"instances.{i}.user", str(e)) from None
        return objects([{"user": str(inst.user), "top": inst.top} for inst in instances])

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        return None  # two fields each: the schema checks them as fast

    def example(self) -> None:
        return None  # answered eagerly, per user

    def describe(self) -> dict[str, Any]:
        return {"kind": "user", "users": self.users,
                "json": {"user": "a user id of the training data", "top": f"1 to {self.max_top} (default 10)"}}
