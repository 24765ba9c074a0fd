"""What ``POST /v1/predict`` answers for each instance, by the run's task.

The backend gives one result per instance: class probabilities (classification), a value in the
target's units (regression), or a text (language and sequence-to-sequence runs). An answerer turns
them into the JSON of each prediction and publishes that prediction's schema for ``/openapi.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from kiln.run import Run


class NotFinite(Exception):
    """The model gave NaN or infinity for an instance: a server fault (broken weights, or a model that
    overflows), not the fault of a request whose inputs passed their checks."""

    def __init__(self, index: int) -> None:
        super().__init__(f"the model's output for instances.{index} is not a finite number (NaN or infinity)")
        self.index = index


class ClassPrediction(BaseModel):
    label: str
    index: int = Field(description="the label's index in the model's classes")
    probability: float = Field(description="the label's probability")
    probabilities: dict[str, float]


class ValuePrediction(BaseModel):
    value: float = Field(description="the predicted value, in the target column's units")


class TextPrediction(BaseModel):
    text: str = Field(description="the text the model wrote (without the prompt or source)")


class RankedItem(BaseModel):
    item: str = Field(description="the item's id in the training data")
    title: str | None = Field(None, description="the item's title, where the run has titles")
    score: float = Field(description="the model's score (a predicted rating, for rating runs); higher ranks first")


class ItemsPrediction(BaseModel):
    items: list[RankedItem] = Field(description="the best items the user has not interacted with, best first")


class ClassAnswers:
    """Classes with probabilities. A binary run picks its positive class when that class's probability
    reaches the decision threshold chosen on validation in training (as ``Run.predict_rows`` does)."""

    prediction = ClassPrediction
    summary = "Predict classes"

    def __init__(self, run: Run) -> None:
        self.task = run.kind.task
        self.names = run.class_names
        self.threshold = run.threshold if self.task == "binary" else None

    def answer(self, probs: np.ndarray) -> list[dict[str, Any]]:
        _check_finite(probs.reshape(len(probs), -1))
        if self.threshold is None:
            chosen = probs.argmax(axis=1)
        else:
            chosen = (probs[:, 1] >= self.threshold).astype(np.int64)
        names = self.names
        return [{"label": names[k], "index": int(k), "probability": round(float(row[k]), 6),
                 "probabilities": {n: round(float(v), 6) for n, v in zip(names, row.tolist(), strict=True)}}
                for row, k in zip(probs, chosen, strict=True)]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "class probabilities", "classes": self.names}
        if self.threshold is not None:
            info |= {"positive": self.names[1], "threshold": self.threshold}
        return info


class ValueAnswers:
    prediction = ValuePrediction
    summary = "Predict values"

    def __init__(self, run: Run) -> None:
        self.task = "regression"
        self.target = run.kind.target_name

    def answer(self, values: np.ndarray) -> list[dict[str, Any]]:
        _check_finite(values.reshape(len(values), -1))
        return [{"value": float(v)} for v in values.tolist()]

    def describe(self) -> dict[str, Any]:
        return {"kind": "value", "target": self.target}


class TextAnswers:
    prediction = TextPrediction

    def __init__(self, run: Run) -> None:
        self.task = run.kind.task  # lm | seq2seq
        self.summary = "Generate text" if self.task == "lm" else "Translate text"

    def answer(self, texts: np.ndarray) -> list[dict[str, Any]]:
        return [{"text": str(t)} for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "meaning": "text after the prompt" if self.task == "lm" else "the target text"}


class ItemAnswers:
    """Ranked items per user (recommendation runs), as the run's kind computed them."""

    prediction = ItemsPrediction
    summary = "Recommend items"

    def __init__(self, run: Run) -> None:
        self.task = run.kind.task

    def answer(self, ranked: np.ndarray) -> list[dict[str, Any]]:
        for i, items in enumerate(ranked):
            if not all(np.isfinite(item["score"]) for item in items):
                raise NotFinite(i)
        return [{"items": list(items)} for items in ranked]

    def describe(self) -> dict[str, Any]:
        return {"kind": "items", "meaning": "the user's best-scored items, not yet interacted with, best first"}


def answers_for(run: Run) -> ClassAnswers | ValueAnswers | TextAnswers | ItemAnswers:
    if run.kind.answers == "items":
        return ItemAnswers(run)
    task = run.kind.task
    if task == "regression":
        return ValueAnswers(run)
    if task in ("lm", "seq2seq"):
        return TextAnswers(run)
    return ClassAnswers(run)


def _check_finite(results: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(results).all(axis=1))
    if len(bad):
        raise NotFinite(int(bad[0]))
