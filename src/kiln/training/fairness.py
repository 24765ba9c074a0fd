"""Fairness for table runs, the parts training and prediction need (the audit itself is :mod:`kiln.audit`).

- :class:`Grouping`: which group a row belongs to, from one raw column of the data. One spec grammar serves
  ``kiln audit --sensitive``, ``train.fairness.sensitive`` and ``fairness.json``:

  ``foreign``                                    each value is a group
  ``personal_status_and_sex:A91=male,A92=female,...``   values mapped to groups (every value must be mapped)
  ``age:25`` or ``age:25,60``                    a numeric column cut at these edges: ``<25``, ``>=25``
  ``age`` with ``kiln audit --bins N``           a numeric column with more than N values: N quantile bins

- Reweighing (``train.fairness: {sensitive: COL, method: reweigh}``, Kamiran and Calders 2012): each training
  row weighs P(group) P(label) / P(group, label), so that under the weights group and label are independent;
  the weights have mean 1 and the loss is their weighted mean (:meth:`kiln.training.objectives.Objective.loss`).
- :class:`GroupThresholds`: per-group decision rules fitted by Fairlearn's ``ThresholdOptimizer`` (in
  ``kiln audit --fit-thresholds``), kept as plain JSON in the run (``fairness.json``, no pickle) and applied here
  by ``Run`` (predict) and by ``kiln serve``. A rule may randomise between two thresholds for scores between
  them; the draw is a hash of the row's model input and group, so the same row always gets the same decision.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import torch
from pydantic import field_validator

from kiln.errors import ConfigError, DataError, KilnError
from kiln.schema import StrictModel

MISSING_GROUP = "(missing)"


class FairnessConfig(StrictModel):
    """``train.fairness``: mitigate unfairness towards the groups of one column while training."""

    sensitive: str  # a column of the data, with an optional grouping (see kiln.training.fairness.Grouping)
    method: Literal["reweigh"] = "reweigh"  # sample weights that make group and label independent

    @field_validator("sensitive")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            Grouping.parse(v)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        return v


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Grouping:
    """How rows fall into groups by one raw column: each value, values mapped to groups, or numeric edges."""

    column: str
    mapping: tuple[tuple[str, str], ...] = ()
    edges: tuple[float, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Grouping:
        column, sep, rest = spec.partition(":")
        column = column.strip()
        if not column:
            raise ConfigError(f"sensitive column {spec!r}: give a column name, e.g. foreign, age:25 or "
                              "personal_status_and_sex:A91=male,A92=female")
        if not sep:
            return cls(column)
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        if parts and all("=" in p for p in parts):
            pairs = tuple((k.strip(), g.strip()) for k, _, g in (p.partition("=") for p in parts))
            if any(not k or not g for k, g in pairs):
                raise ConfigError(f"sensitive column {spec!r}: a map is VALUE=GROUP,VALUE=GROUP,...")
            return cls(column, mapping=pairs)
        edges = [_number(p) for p in parts]
        if not parts or None in edges:
            raise ConfigError(f"sensitive column {spec!r}: after {column}: give VALUE=GROUP pairs "
                              f"({column}:A91=male,A92=female) or increasing numeric edges ({column}:25 or "
                              f"{column}:25,60)")
        if any(b <= a for a, b in pairwise(edges)):
            raise ConfigError(f"sensitive column {spec!r}: the edges must increase")
        return cls(column, edges=tuple(edges))  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        if self.mapping:
            return f"{self.column}:" + ",".join(f"{k}={g}" for k, g in self.mapping)
        if self.edges:
            return f"{self.column}:" + ",".join(f"{e:g}" for e in self.edges)
        return self.column

    def labels(self) -> list[str] | None:
        """The groups in their natural order where the grouping fixes them (edges, a map), else None."""
        if self.edges:
            e = self.edges
            return [f"<{e[0]:g}"] + [f"{a:g}-<{b:g}" for a, b in pairwise(e)] + [f">={e[-1]:g}"]
        if self.mapping:
            return list(dict.fromkeys(g for _, g in self.mapping))
        return None

    def groups(self, values: list[str | None]) -> list[str]:
        """The group of each raw value; a DataError names a value the grouping cannot place."""
        if self.edges:
            labels = self.labels() or []
            out = []
            for v in values:
                x = None if v is None else _number(v)
                if v is None:
                    out.append(MISSING_GROUP)
                elif x is None:
                    raise DataError(f"column {self.column!r} holds {v!r}, not a number, so it cannot be cut at "
                                    f"{', '.join(f'{e:g}' for e in self.edges)}")
                else:
                    out.append(labels[int(np.searchsorted(self.edges, x, side="right"))])
            return out
        if self.mapping:
            table = dict(self.mapping)
            unmapped = sorted({v for v in values if v is not None and v not in table})
            if unmapped:
                raise DataError(f"column {self.column!r} holds {', '.join(map(repr, unmapped[:5]))}, which its map "
                                f"({self.spec}) does not place in a group; map every value")
            return [MISSING_GROUP if v is None else table[v] for v in values]
        return [MISSING_GROUP if v is None else v for v in values]

    def with_quantile_bins(self, values: list[str | None], bins: int) -> Grouping:
        """A plain numeric column with more than ``bins`` distinct values cut at its quantiles (of ``values``);
        any other grouping as it is."""
        if self.mapping or self.edges:
            return self
        numbers = [_number(v) for v in values if v is not None]
        if not numbers or None in numbers or len(set(numbers)) <= bins:
            return self
        qs = np.quantile(np.asarray(numbers, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
        edges = tuple(float(q) for q in np.unique(qs) if q > min(numbers))
        return Grouping(self.column, edges=edges) if edges else self


# ---- reweighing --------------------------------------------------------------------------------------------


def reweigh(groups: list[str], labels: np.ndarray) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
    """Kamiran and Calders' weights: w(g, y) = P(g) P(y) / P(g, y), so that group and label are independent
    under the weights (mean 1). Returns each row's weight and the weight of each (group, label) cell."""
    g = np.asarray(groups, dtype=object)
    y = np.asarray(labels)
    n = len(y)
    weights = np.empty(n, dtype=np.float64)
    cells: dict[str, dict[str, float]] = {}
    for group in sorted(set(groups)):
        in_g = g == group
        for label in np.unique(y):
            cell = in_g & (y == label)
            w = in_g.sum() * (y == label).sum() / (n * cell.sum()) if cell.any() else 0.0
            weights[cell] = w
            cells.setdefault(group, {})[str(label)] = float(w)
    return weights, cells


def sample_weights(fairness: FairnessConfig | None, kind, train_y: torch.Tensor,
                   device: torch.device | None = None) -> tuple[torch.Tensor | None, str]:
    """Per-row loss weights of the training split for ``train.fairness`` (None without it), and a line for the
    log. Refused before anything is written: a task other than classification, a column the data lacks."""
    if fairness is None:
        return None, ""
    if kind.task not in ("binary", "multiclass"):
        raise ConfigError(f"train.fairness applies to classification; this task is {kind.task}")
    grouping = Grouping.parse(fairness.sensitive)
    try:
        values = kind.column_values("train", grouping.column)
        groups = grouping.groups(values)
    except KilnError as e:
        raise ConfigError(f"train.fairness.sensitive: {e}") from None
    if len(groups) != len(train_y):
        raise ConfigError(f"train.fairness.sensitive: {len(groups)} values for {len(train_y)} training samples")
    weights, cells = reweigh(groups, train_y.numpy())
    names = list(kind.class_names)
    shown = "; ".join(f"{g}: " + ", ".join(f"{names[int(k)]} {w:.3f}" for k, w in c.items())
                      for g, c in cells.items())
    note = f"reweighing by {grouping.spec} (Kamiran-Calders weights): {shown}"
    return torch.from_numpy(weights).float().to(device), note


# ---- per-group thresholds ---------------------------------------------------------------------------------


def _threshold_json(t: float) -> float | str:
    return t if math.isfinite(t) else ("inf" if t > 0 else "-inf")


@dataclass
class GroupRule:
    """Fairlearn's interpolation for one group: with probability p0 decide ``score op0 t0``, else ``score op1 t1``;
    then, with probability p_ignore, decide ``constant`` instead (equalized odds)."""

    p0: float
    op0: str
    t0: float
    p1: float
    op1: str
    t1: float
    p_ignore: float = 0.0
    constant: float = 0.0

    def positive_probability(self, scores: np.ndarray) -> np.ndarray:
        def op(kind: str, t: float) -> np.ndarray:
            return (scores > t) if kind == ">" else (scores < t)

        p = self.p0 * op(self.op0, self.t0) + self.p1 * op(self.op1, self.t1)
        return self.p_ignore * self.constant + (1.0 - self.p_ignore) * p

    def to_json(self) -> dict[str, Any]:
        return {"p0": self.p0, "operation0": [self.op0, _threshold_json(self.t0)], "p1": self.p1,
                "operation1": [self.op1, _threshold_json(self.t1)], "p_ignore": self.p_ignore,
                "prediction_constant": self.constant}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> GroupRule:
        (op0, t0), (op1, t1) = d["operation0"], d["operation1"]
        if op0 not in "<>" or op1 not in "<>":
            raise ValueError("operations are '<' or '>'")
        return cls(float(d["p0"]), op0, float(t0), float(d["p1"]), op1, float(t1), float(d.get("p_ignore", 0.0)),
                   float(d.get("prediction_constant", 0.0)))


@dataclass
class GroupThresholds:
    """Per-group decision rules on P(positive class), for one sensitive column; ``enabled``: predict and serve
    apply them."""

    grouping: Grouping
    rules: dict[str, GroupRule]
    constraint: str
    enabled: bool = True
    fitted_on: str = "val"
    seed: int = 0  # salt of the hash that draws a randomised decision

    def to_json(self) -> dict[str, Any]:
        return {"sensitive": self.grouping.spec, "column": self.grouping.column, "constraint": self.constraint,
                "enabled": self.enabled, "fitted_on": self.fitted_on, "seed": self.seed,
                "method": "fairlearn.postprocessing.ThresholdOptimizer(prefit=True, predict_method='predict_proba')",
                "groups": {g: r.to_json() for g, r in self.rules.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = "fairness.json") -> GroupThresholds:
        try:
            rules = {str(g): GroupRule.from_json(r) for g, r in d["groups"].items()}
            return cls(Grouping.parse(d["sensitive"]), rules, str(d["constraint"]), bool(d["enabled"]),
                       str(d.get("fitted_on", "val")), int(d.get("seed", 0)))
        except (KeyError, TypeError, ValueError, AttributeError, KilnError) as e:
            raise KilnError(f"{where} is not a valid per-group threshold file ({type(e).__name__}: {e}); fit it "
                            "again with kiln audit RUN --sensitive COL --fit-thresholds") from None

    def check_groups(self, groups: list[str], where: str = "row") -> None:
        unknown = [(i, g) for i, g in enumerate(groups) if g not in self.rules]
        if unknown:
            i, g = unknown[0]
            raise DataError(f"{where} {i + 1}: {self.grouping.column} gives group {g!r}, which has no threshold "
                            f"(fitted groups: {', '.join(self.rules)})")

    def positive_probability(self, scores: np.ndarray, groups: list[str]) -> np.ndarray:
        """P(decide positive) for each row (what Fairlearn's ``_pmf_predict`` gives)."""
        scores = np.asarray(scores, dtype=np.float64)
        self.check_groups(groups)
        g = np.asarray(groups, dtype=object)
        out = np.zeros(len(scores))
        for group, rule in self.rules.items():
            mask = g == group
            out[mask] = rule.positive_probability(scores[mask])
        return out

    def draws(self, inputs: np.ndarray, groups: list[str]) -> np.ndarray:
        """A uniform number in [0, 1) per row from a hash of its model input (float32 bytes) and group."""
        rows = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32)).reshape(len(groups), -1)
        salt = str(self.seed).encode()
        return np.array([int.from_bytes(hashlib.blake2b(row.tobytes() + b"\0" + g.encode() + b"\0" + salt,
                                                        digest_size=8).digest(), "little") / 2.0**64
                         for row, g in zip(rows, groups, strict=True)])

    def decide(self, scores: np.ndarray, inputs: np.ndarray, groups: list[str]) -> np.ndarray:
        """The positive decisions (bool) for rows with scores P(positive), model inputs and groups."""
        return self.positive_probability(scores, groups) > self.draws(inputs, groups)

    def decide_raw(self, scores: np.ndarray, inputs: np.ndarray, values: list[str | None]) -> np.ndarray:
        """As :meth:`decide`, from the raw values of the sensitive column."""
        return self.decide(scores, inputs, self.grouping.groups(values))
