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


class LabelsPrediction(BaseModel):
    labels: list[str] = Field(description="the labels whose probability reaches 0.5 (any number of them)")
    probabilities: dict[str, float] = Field(description="each label's own probability")


class ValuePrediction(BaseModel):
    value: float = Field(description="the predicted value, in the target column's units")


class ForecastStep(BaseModel):
    time: str = Field(description="the step's time, written as the series writes its times")
    value: float = Field(description="the forecast, in the series' units")


class ForecastPrediction(BaseModel):
    forecast: list[ForecastStep] = Field(description="the steps after the history's last, in order")


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
        if self.threshold is None:
            chosen = probs.argmax(axis=1)
        else:
            chosen = (probs[:, 1] >= self.threshold).astype(np.int64)
        return self.records(probs, chosen)

    def records(self, probs: np.ndarray, chosen: np.ndarray) -> list[dict[str, Any]]:
        """The answers for probabilities and the chosen class of each row."""
        _check_finite(probs.reshape(len(probs), -1))
        names = self.names
        return [{"label": names[k], "index": int(k), "probability": round(float(row[k]), 6),
                 "probabilities": {n: round(float(v), 6) for n, v in zip(names, row.tolist(), strict=True)}}
                for row, k in zip(probs, chosen, strict=True)]

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"kind": "class probabilities", "classes": self.names}
        if self.threshold is not None:
            info |= {"positive": self.names[1], "threshold": self.threshold}
        return info


class LabelsAnswers:
    """Multilabel: every label whose own probability reaches 0.5, and each label's probability."""

    prediction = LabelsPrediction
    summary = "Predict labels"

    def __init__(self, run: Run) -> None:
        self.task = "multilabel"
        self.names = run.class_names

    def answer(self, probs: np.ndarray) -> list[dict[str, Any]]:
        _check_finite(probs.reshape(len(probs), -1))
        return [{"labels": [n for n, v in zip(self.names, row.tolist(), strict=True) if v >= 0.5],
                 "probabilities": {n: round(float(v), 6) for n, v in zip(self.names, row.tolist(), strict=True)}}
                for row in probs]

    def describe(self) -> dict[str, Any]:
        return {"kind": "label probabilities", "labels": self.names, "threshold": 0.5}


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


class ForecastAnswers:
    """The steps after a history, with their times, in the series' units (the run's kind undoes its scaling and
    target transform per history)."""

    prediction = ForecastPrediction
    summary = "Forecast a series"

    def __init__(self, run: Run) -> None:
        self.task = "forecast"
        self.target = run.kind.target_name

    def answer(self, forecasts: np.ndarray) -> list[dict[str, Any]]:
        values = np.array([[s["value"] for s in f["forecast"]] for f in forecasts], dtype=np.float64)
        _check_finite(values.reshape(len(values), -1))
        return list(forecasts)

    def describe(self) -> dict[str, Any]:
        return {"kind": "forecast", "target": self.target}


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


def answers_for(run: Run) -> ClassAnswers | LabelsAnswers | ValueAnswers | TextAnswers | ForecastAnswers | ItemAnswers:
    if run.kind.answers == "items":
        return ItemAnswers(run)
    task = run.kind.task
    if task == "regression":
        return ValueAnswers(run)
    if task == "forecast":
        return ForecastAnswers(run)
    if task == "multilabel":
        return LabelsAnswers(run)
    if task in ("lm", "seq2seq"):
        return TextAnswers(run)
    return ClassAnswers(run)


def _check_finite(results: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(results).all(axis=1))
    if len(bad):
        raise NotFinite(int(bad[0]))
