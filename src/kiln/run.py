"""``Run``: a trained model and everything known about it, read from its run directory alone.

It answers evaluate and predict itself, and whatever else its kind of data offers (generate text, translate,
predict table rows) by asking that kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import Config, load_config
from kiln.data.kind import DataKind, open_kind
from kiln.errors import KilnError, RunDirError
from kiln.explain import explain, explain_global
from kiln.nn import KilnModel, build_model
from kiln.nn.fuse import fuse
from kiln.nn.generate import Sampling
from kiln.nn.onnx_model import OnnxModel
from kiln.rundir import RunDir, open_run_dir
from kiln.training.checkpoint import load_weights
from kiln.training.fairness import GroupThresholds
from kiln.training.metrics import evaluate, model_outputs, probabilities
from kiln.training.precision import inference_precision, pick_fuse

SPLITS = ("train", "val", "test")


class Run:
    """A trained model and everything known about it, read from its run directory alone."""

    def __init__(self, run_dir: RunDir, config: Config, model: KilnModel, device: torch.device,
                 kind: DataKind | None = None) -> None:
        self.dir = run_dir
        self.path = run_dir.path
        self.config = config
        self.model = model
        self.device = device
        self.kind = kind or open_kind(config.data, config.seed, run_dir.path)
        self.precision = inference_precision(config.train.precision, device)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Run:
        run_dir = open_run_dir(path)
        config = load_config(run_dir / RunDir.CONFIG)
        device = torch.device(device)
        kind = open_kind(config.data, config.seed, run_dir.path)
        model = build_model(config.blocks, kind.input_shape).to(device)
        weights = run_dir / RunDir.WEIGHTS
        if not weights.is_file():
            raise RunDirError(f"{run_dir.path} has no {RunDir.WEIGHTS}: its training did not finish. Continue it "
                              f"with `{run_dir.resume_hint()}`")
        load_weights(weights, model)
        if (run_dir / RunDir.INT8_ONNX).is_file():  # a quantized run (kiln compress) predicts with its int8 graph
            model = OnnxModel(run_dir / RunDir.INT8_ONNX)
        elif pick_fuse(config.train.fuse, device)[0]:
            fuse(model)
        model.eval()
        return cls(run_dir, config, model, device, kind)

    # ---- what the run is -----------------------------------------------------------------------

    @property
    def manifest(self) -> dict[str, Any]:
        return self.dir.read_json(RunDir.MANIFEST)

    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics by split, e.g. ``run.metrics["test"]["accuracy"]``."""
        return self.dir.read_json(RunDir.RESULTS)

    @property
    def class_names(self) -> list[str]:
        return list(self.kind.class_names)

    @property
    def threshold(self) -> float:
        """Binary decision threshold on P(positive class), as chosen on validation in training."""
        return float(self.metrics.get("threshold", 0.5)) if self.kind.task == "binary" else 0.5

    @property
    def group_thresholds(self) -> GroupThresholds | None:
        """Per-group decision thresholds saved with the run (``fairness.json``, by ``kiln audit --fit-thresholds``)
        when they are enabled; predict and serve then decide by them."""
        if not hasattr(self, "_group_thresholds"):
            path = self.dir / RunDir.FAIRNESS
            rules = GroupThresholds.from_json(self.dir.read_json(RunDir.FAIRNESS), str(path)) if path.is_file() \
                else None
            self._group_thresholds = rules if rules is not None and rules.enabled else None
        return self._group_thresholds

    def positive(self, p: np.ndarray, inputs: np.ndarray, columns: dict[str, list]) -> np.ndarray:
        """A binary run's decisions (bool) for rows with P(positive) ``p``: ``p`` reaches the run's threshold, or
        with per-group thresholds enabled the rule of each row's group, read from its raw ``columns`` (by name)."""
        rules = self.group_thresholds
        if rules is None:
            return np.asarray(p) >= self.threshold
        column = rules.grouping.column
        if column not in columns:
            raise KilnError(f"{self.path} decides by per-group thresholds on column {column!r} (fairness.json): "
                            f"every row must give {column!r}; turn them off with kiln audit {self.path} "
                            "--thresholds off")
        return rules.decide_raw(np.asarray(p, dtype=np.float64), np.asarray(inputs), columns[column])

    # ---- evaluate and predict ------------------------------------------------------------------

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> dict[str, float]:
        if split not in SPLITS:
            raise KilnError(f"split must be {', '.join(SPLITS)}, not {split!r}")
        x, y = self.kind.load().split(split)
        if len(x) == 0:
            raise KilnError(f"the {split} split of this run is empty (data.val_fraction is 0?)")
        t = self.config.train
        size = batch_size or (t.batch_size if self.kind.trains_by_steps else t.eval_batch_size)
        return evaluate(self.model, self.kind, self.kind.eval_batches(x, y, size), device=self.device,
                        precision=self.precision, threshold=self.threshold)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Raw model outputs (logits, or standardised values) for stored inputs."""
        return model_outputs(self.model, x, self.kind.to_input, batch_size=self.config.train.eval_batch_size,
                             device=self.device, precision=self.precision)

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities (N, classes), or for regression values (N,) in the target's units.

        Images: (N, C, H, W) or (N, H, W), uint8 0..255 or float 0..1. Tables: rows as model input (N, features),
        e.g. from :meth:`rows_input`. Text classification: a text or a list of texts (multilabel: each label's
        probability, (N, labels)).
        """
        texts = isinstance(x, str) or (isinstance(x, list | tuple) and bool(x) and all(isinstance(t, str) for t in x))
        x = self.kind.as_stored(x if texts else torch.as_tensor(x))
        shape = self.kind.input_shape
        if tuple(x.shape[1:]) != tuple(shape):
            raise KilnError(f"predict expects input of shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        return self.from_outputs(self.outputs(x))

    def from_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs to what :meth:`predict` returns: class probabilities, or values in the target's units (a
        forecast's outputs stay scaled and transformed: :meth:`forecast` answers in the series' units)."""
        if self.kind.task == "forecast":
            return outputs
        if self.kind.task == "regression":
            mean, std = self.kind.target_scale
            return outputs[:, 0] * std + mean
        return probabilities(outputs, self.kind.task)

    def predict_files(self, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Predictions for files, one record per input: image files, CSV rows, source lines, by the run's kind."""
        return self.kind.predict_files(self, list(paths))

    # ---- what only some kinds of data offer ----------------------------------------------------

    def _offered(self, name: str):
        method = getattr(self.kind, name, None)
        if method is None:
            raise KilnError(f"{self.path} is a {self.kind.description} run, which has no {name}; {self.kind.usage}")
        return method

    def generate(self, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
                 cache: bool = True) -> str:
        """Text a language-model run writes after ``prompt`` (without the prompt). ``temperature=0`` is greedy;
        ``stop`` strings end the text before the first of them; ``cache=False`` recomputes every step."""
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, list(stop))
        return self._offered("generate")(self.model, prompt, sampling, cache)

    def translate(self, sources: list[str], cache: bool = True) -> list[str]:
        """Greedy targets for source texts (a ``text_pairs`` run)."""
        return self._offered("translate")(self.model, list(sources), self.config.train.eval_batch_size, cache)

    def forecast(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """A time-series run's forecast after ``history`` (its latest rows, column name -> value, at least the
        lookback): ``{"forecast": [{"time": ..., "value": ...}, ...]}`` in the series' units."""
        return self._offered("forecast")(self, history)
    def recommend(self, users: list, top: int = 10) -> list[dict[str, Any]]:
        """For each user id (an interactions run), the ``top`` best-scored items the user has not interacted with:
        one record per (user, rank) with ``item``, ``title`` (where the run has titles) and ``score``."""
        return self._offered("recommend")(self, list(users), top)

    def rows_input(self, table) -> torch.Tensor:
        """Raw table rows (a :class:`kiln.data.table.Table`) to model input with the run's saved preprocessing."""
        self._offered("predict_table")
        return self.kind.prep.transform(table)

    def predict_table(self, table) -> list[dict[str, Any]]:
        """One dict per table row: ``prediction`` and, for classification, ``probability_<class>`` per class."""
        return self._offered("predict_table")(self, table)

    def predict_texts(self, texts: list[str]) -> list[dict[str, Any]]:
        """A text-classification run's answer for each text: its class (or labels) and every probability."""
        return self._offered("predict_texts")(self, [texts] if isinstance(texts, str) else list(texts))

    def explain(self, inputs, method: str = "integrated_gradients", out: str | Path | None = None,
                target: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Attributions for inputs (files, or an array as :meth:`predict` takes it; ``limit``: the first so many):
        one JSON and a picture each in ``explanations/`` (or ``out``); see :mod:`kiln.explain`. ``target``: the
        class to explain (default: the predicted one)."""
        return explain(self, inputs, method, out, target, limit)

    def explain_global(self, method: str = "occlusion", split: str = "test", limit: int | None = 1000,
                       out: str | Path | None = None) -> dict[str, Any]:
        """A table run's columns ranked by mean |attribution| over the first ``limit`` rows of ``split``."""
        return explain_global(self, method, split, limit, out)

    def predict_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Predictions for raw rows as a client sends them (column name -> value)."""
        return self._offered("predict_rows")(self, rows)
