"""Served text requests: a source text for a ``text_pairs`` (sequence-to-sequence) run, a prompt and its sampling
settings for a ``text`` (language model) run.

Both are checked here against the run's own tokenizer (a character tokenizer knows only the characters of
its training text; a source may be at most as long as the longest training source), so generation on the
worker never fails on a client's text. A batch is a 1-d object array: source texts, or per prompt the
keyword arguments of ``Run.generate``.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, Strict, create_model

from kiln.data.requests import objects
from kiln.errors import InputError, KilnError

MAX_TEXT_CHARS = 4096  # a source or a prompt; a language model reads only its last `context` tokens anyway
MAX_NEW_TOKENS = 512  # per prompt: generation holds the worker one token at a time
MAX_STOPS = 8
MAX_STOP_CHARS = 64
MAX_SEED = 2**63 - 1
STRICT = ConfigDict(extra="forbid")


def token_count(tokenizer: Any, text: str, where: str) -> int:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(where, "the text holds a lone surrogate (\\ud800-\\udfff), which is not a character") from None
    try:
        return len(tokenizer.encode(text))
    except KilnError as e:
        raise InputError(where, str(e)) from None


def _text(description: str) -> Any:
    return Annotated[str, Strict(), Field(min_length=1, max_length=MAX_TEXT_CHARS, description=description)]


class SourceInputs:
    """``{"text": source}``; answered with the greedy target text (``Run.translate``)."""

    kind = "text"
    accepts_files = False

    def __init__(self, tokenizer: Any, source_steps: int) -> None:
        self.tokenizer = tokenizer
        self.steps = source_steps
        self._model = create_model(
            "SourceInstance", __config__=STRICT,
            text=(_text(f"the source text: at most {self.steps} tokens ({self.tokenizer.kind} tokenizer), the "
                        "longest source of the training pairs"), ...))

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        for i, inst in enumerate(instances):
            where = f"instances.{i}.text"
            n = token_count(self.tokenizer, inst.text, where)
            if n > self.steps:
                raise InputError(where, f"{n} tokens; this model reads at most {self.steps} (the longest source it "
                                      "was trained on)")
        return objects([inst.text for inst in instances])

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        return None  # one string each: the schema checks it as fast

    def example(self) -> None:
        return None  # no traced copy to warm: text runs decode eagerly

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "json": '{"text": source}', "max_tokens": self.steps,
                "max_characters": MAX_TEXT_CHARS, "tokenizer": self.tokenizer.kind}


class PromptInputs:
    """A prompt with the sampling settings of ``Run.generate``; answered with the text after the prompt."""

    kind = "prompt"
    accepts_files = False

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer = tokenizer
        self.context = context
        vocab = self.tokenizer.vocab_size
        number = Annotated[float, Strict(), Field(allow_inf_nan=False)]
        integer = Annotated[int, Strict()]
        self._model = create_model(
            "PromptInstance", __config__=STRICT,
            prompt=(_text(f"text to continue; the model reads its last {self.context} tokens"), ...),
            max_new_tokens=(integer, Field(200, ge=1, le=MAX_NEW_TOKENS, description="tokens to write at most")),
            temperature=(number, Field(1.0, ge=0, le=100, description="0: always the most likely token")),
            top_k=(integer | None, Field(None, ge=1, le=vocab, description="sample among the k most likely tokens")),
            top_p=(number | None, Field(None, gt=0, le=1, description="sample among the fewest tokens whose "
                                                                      "probabilities sum to p")),
            seed=(integer | None, Field(None, ge=0, le=MAX_SEED, description="the same seed writes the same text")),
            stop=(list[Annotated[str, Strict(), Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                  Field([], max_length=MAX_STOPS, description="end the text before the first of these strings")),
        )

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        requests = []
        for i, inst in enumerate(instances):
            if token_count(self.tokenizer, inst.prompt, f"instances.{i}.prompt") == 0:
                raise InputError(f"instances.{i}.prompt", "the prompt gives no tokens; give some text")
            requests.append(inst.model_dump())
        return objects(requests)

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        return None  # a few fields each: the schema checks them as fast

    def example(self) -> None:
        return None  # no traced copy to warm: text runs decode eagerly

    def describe(self) -> dict[str, Any]:
        return {"kind": "prompt", "context": self.context, "tokenizer": self.tokenizer.kind,
                "json": {"prompt": f"text, 1 to {MAX_TEXT_CHARS} characters",
                         "max_new_tokens": f"1 to {MAX_NEW_TOKENS} (default 200)",
                         "temperature": "0 to 100 (default 1; 0 is greedy)",
                         "top_k": f"1 to {self.tokenizer.vocab_size}",
                         "top_p": "(0, 1]", "seed": f"0 to {MAX_SEED}",
                         "stop": f"up to {MAX_STOPS} strings of 1 to {MAX_STOP_CHARS} characters"}}
