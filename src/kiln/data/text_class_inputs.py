"""Served texts for a text-classification run (``text_classes``): ``{"instances": ["a text", ...]}``.

Each instance is one text of 1 to ``MAX_TEXT_CHARS`` characters that is not blank; the run's own tokenizer turns it
into padded ids as in training (a text longer than ``data.max_tokens`` tokens keeps its first ones), so a served
text gets the answer ``kiln predict --text`` gives it.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field, Strict

from kiln.errors import InputError

MAX_TEXT_CHARS = 100_000  # one text; the model reads only its first data.max_tokens tokens


class TextClassInputs:
    kind = "text"
    accepts_files = False

    def __init__(self, data: Any) -> None:
        self.data = data  # the run's TextClasses kind: its tokenizer, padding and max_tokens

    def instance_model(self) -> Any:
        return Annotated[str, Strict(), Field(min_length=1, max_length=MAX_TEXT_CHARS, description=(
            f"a text to classify; the model reads its first {self.data.cfg.max_tokens} tokens "
            f"({self.data.tokenizer.kind} tokenizer)"), examples=["a text to classify"])]

    def from_instances(self, instances: list[str]) -> np.ndarray:
        for i, text in enumerate(instances):
            if not text.strip():
                raise InputError(f"instances.{i}", "the text is blank; give some text to classify")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InputError(f"instances.{i}", "the text holds a lone surrogate (\\ud800-\\udfff), which is not "
                                                   "a character") from None
        return self.data.encode_texts(list(instances))[0].numpy()

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        """Plain, non-blank strings of allowed length go straight to the tokenizer; anything else through the schema."""
        if all(isinstance(t, str) and 0 < len(t) <= MAX_TEXT_CHARS and t.strip() for t in instances):
            try:
                return self.from_instances(instances)
            except InputError:
                return None
        return None

    def example(self) -> None:
        return None  # served eagerly: each batch is cut to its longest text, a shape a trace would fix

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "json": '["text", ...]: one string per instance',
                "max_tokens": self.data.cfg.max_tokens, "max_characters": MAX_TEXT_CHARS, "tokenizer": self.data.tokenizer.kind,
                "longer_texts": f"keep their first {self.data.cfg.max_tokens} tokens"}
