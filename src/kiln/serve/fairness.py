"""Serving a run that decides by per-group thresholds (``fairness.json`` enabled; see
:mod:`kiln.training.fairness`): each instance must give the sensitive column, and each answer's label is its
group's decision, as ``kiln predict`` decides the same row.

The group travels with the batch: the inputs add one last column to it (the index of the row's group), the
backend takes it off before the model runs and puts the decision there after it, and the answers read it.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field, Strict, create_model

from kiln.errors import InputError, KilnError
from kiln.run import Run
from kiln.training.fairness import GroupThresholds

MAX_TEXT = 1000  # characters of a sensitive value


class GroupedInputs:
    """The run's table inputs, and each instance's group as the batch's last column."""

    def __init__(self, inner, rules: GroupThresholds) -> None:
        self.inner, self.rules = inner, rules
        self.kind, self.accepts_files = inner.kind, inner.accepts_files
        self.names = list(rules.rules)
        self.column = rules.grouping.column
        base = inner.instance_model()
        self.field = next((n for n, f in base.model_fields.items() if f.alias == self.column), None)
        self.input_column = next((c for c in getattr(inner, "columns", []) if c.name == self.column), None)
        about = (f"the group for the run's per-group decision thresholds ({rules.grouping.spec}; groups: "
                 f"{', '.join(self.names)})")
        if self.field is None:  # a column the model was not trained on: asked for besides its inputs
            kind: Any = Annotated[str, Strict(), Field(max_length=MAX_TEXT)] | Annotated[float, Strict()] | \
                Annotated[int, Strict()]
            self.field = "sensitive_group_"
            self._model = create_model("TableRow", __base__=base, sensitive_group_=(
                kind, Field(..., alias=self.column, title=self.column, description=about)))
        else:
            self._model = base

    def instance_model(self) -> type[BaseModel]:
        return self._model

    def _raw(self, value: Any) -> str | None:
        c = self.input_column
        if isinstance(value, bool) and c is not None and c.type == "boolean":
            return c.true_value if value else c.false_value
        return None if value is None else str(value)

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        codes = []
        for i, inst in enumerate(instances):
            try:
                group = self.rules.grouping.groups([self._raw(getattr(inst, self.field))])[0]
            except KilnError as e:
                raise InputError(f"instances.{i}.{self.column}", str(e)) from None
            if group not in self.rules.rules:
                raise InputError(f"instances.{i}.{self.column}", f"gives group {group!r}, which has no decision "
                                 f"threshold (groups: {', '.join(self.names)}); this run decides by per-group "
                                 "thresholds, so every instance must give a value of a fitted group")
            codes.append(self.names.index(group))
        batch = self.inner.from_instances(instances)
        return np.concatenate([batch, np.asarray(codes, dtype=batch.dtype)[:, None]], axis=1)

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        return None

    def example(self) -> np.ndarray | None:
        x = self.inner.example()
        return None if x is None else np.concatenate([x, np.zeros((len(x), 1), dtype=x.dtype)], axis=1)

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "group_thresholds": {
            "column": self.column, "sensitive": self.rules.grouping.spec, "groups": self.names,
            "required": True}}


class GroupedBackend:
    """The run's backend on the model's inputs; the decision of each row's group replaces the group column."""

    def __init__(self, inner, rules: GroupThresholds) -> None:
        self.inner, self.rules, self.names = inner, rules, list(rules.rules)
        self.name = inner.name

    @property
    def mode(self) -> str:
        return self.inner.mode

    def start(self, example: np.ndarray | None = None) -> None:
        self.inner.start(None if example is None else np.ascontiguousarray(example[:, :-1]))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        inputs = np.ascontiguousarray(batch[:, :-1])
        probs = self.inner.predict(inputs)
        groups = [self.names[int(k)] for k in batch[:, -1]]
        positive = self.rules.decide(probs[:, 1].astype(np.float64), inputs, groups)
        return np.concatenate([probs, positive.astype(probs.dtype)[:, None]], axis=1)


class GroupedAnswers:
    """Class answers whose label is the decision the backend put after the probabilities."""

    def __init__(self, inner, rules: GroupThresholds) -> None:
        self.inner, self.rules = inner, rules
        self.prediction, self.summary, self.task = inner.prediction, inner.summary, inner.task

    def answer(self, results: np.ndarray) -> list[dict[str, Any]]:
        return self.inner.records(results[:, :-1], results[:, -1].astype(np.int64))

    def describe(self) -> dict[str, Any]:
        info = {k: v for k, v in self.inner.describe().items() if k != "threshold"}
        return {**info, "decision": f"per-group thresholds ({self.rules.constraint}) on {self.rules.grouping.spec}",
                "group_thresholds": self.rules.to_json()["groups"]}


def with_group_thresholds(run: Run, adapter, answers, backend, example):
    """The adapter, answers, backend and example batch of a run, wrapped when it decides by per-group thresholds."""
    rules = run.group_thresholds
    if rules is None:
        return adapter, answers, backend, example
    if run.kind.task != "binary" or not hasattr(answers, "records"):
        raise KilnError(f"{run.path} has per-group thresholds, which apply to binary table runs only")
    grouped = GroupedInputs(adapter, rules)
    return grouped, GroupedAnswers(answers, rules), GroupedBackend(backend, rules), grouped.example()
