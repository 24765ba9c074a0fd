"""The contract of a served request's reader: what a kind of data's ``inputs()`` returns.

An adapter turns what a client sends (JSON instances, uploaded files) into the array a backend predicts
on, and publishes the JSON schema of one instance for ``/openapi.json``. Every check happens at this
boundary: a bad instance raises :class:`kiln.errors.InputError` naming it (answered with a 4xx).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel


class InputAdapter(Protocol):
    kind: str  # what an instance is: image, table, text, prompt
    accepts_files: bool  # multipart uploads (``from_files``) besides JSON instances

    def instance_model(self) -> type[BaseModel]:
        """The pydantic model of one JSON instance; its schema goes in the OpenAPI document."""

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        """Validated instances to one batch for the backend."""

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        """A fast path for parsed JSON instances that are plainly valid; ``None`` sends them through
        the schema instead (which names what is wrong)."""

    def from_files(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        """Uploaded (filename, content) pairs to one batch (only where ``accepts_files``)."""

    def example(self) -> np.ndarray | None:
        """One typical input batch, to trace and warm the backend with; ``None`` where there is nothing to trace."""

    def describe(self) -> dict[str, Any]:
        """What the model takes, for ``GET /v1/model``."""


def objects(items: list[Any]) -> np.ndarray:
    """A 1-d object array of ``items`` (which numpy must not unpack into more dimensions): a batch of texts."""
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out
