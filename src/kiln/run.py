"""A run directory and the ``Run`` object that everything after training reads.

Layout of ``runs/<name>/``::

    config.yaml                   resolved config: trains again as it is
    manifest.json                 versions, seed, device, precision, data checksums, status
    metrics.jsonl                 one JSON object per progress line, epoch and final test
    checkpoints/last.safetensors  weights + optimiser, scheduler, RNG and data-order state (resume)
    checkpoints/best.safetensors  weights of the best validation epoch
    model.safetensors             final weights (best epoch when early stopping restores it)
    results.json                  final train / val / test metrics (and a binary task's decision threshold)
    preprocessing.json            tables: column types and statistics fitted on the training rows

Every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import Config, load_config
from kiln.data.datasets import Dataset, open_dataset
from kiln.data.images import PIXEL_SCALE, read_image_file
from kiln.data.table import Table, read_table, rows_to_table
from kiln.data.tabular import PREPROCESSING, Tabular
from kiln.data.text import Text, TextPairs, TokenData
from kiln.errors import KilnError, RunDirError
from kiln.fsutil import atomic_write_text
from kiln.nn import KilnModel, build_model
from kiln.nn.fuse import fuse
from kiln.train.checkpoint import load_weights
from kiln.train.metrics import model_outputs, probabilities, task_metrics
from kiln.train.precision import pick_fuse


class RunDir:
    CONFIG = "config.yaml"
    MANIFEST = "manifest.json"
    METRICS = "metrics.jsonl"
    RESULTS = "results.json"
    PREPROCESSING = PREPROCESSING
    WEIGHTS = "model.safetensors"
    LAST = "checkpoints/last.safetensors"
    BEST = "checkpoints/best.safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def is_run(self) -> bool:
        return (self / self.MANIFEST).is_file() and (self / self.CONFIG).is_file()

    def check_new(self) -> None:
        """Refuse a directory that holds anything: a new run never overwrites files."""
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            what = "a kiln run" if self.is_run() else "files"
            raise RunDirError(
                f"{self.path} already holds {what}; nothing was changed. Continue it with --resume, "
                f"or choose another directory with --out"
            )

    def create(self) -> None:
        self.check_new()
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads((self / name).read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path} has no {name}") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self / name} is corrupt: {e}") from None

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self / name, json.dumps(data, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self / self.METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self / self.METRICS
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill: what follows it was never written
        return records

    def keep_metrics_until(self, step: int) -> None:
        """On resume: drop records written after the checkpoint we continue from."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step and r.get("kind") != "test"]
        atomic_write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def open_run_dir(path: str | Path) -> RunDir:
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise RunDirError(f"{run_dir.path} is not a directory; give the folder a `kiln train` run wrote")
    if not run_dir.is_run():
        raise RunDirError(
            f"{run_dir.path} is not a kiln run directory (it has no {RunDir.MANIFEST} and {RunDir.CONFIG}); "
            "give the folder a `kiln train` run wrote, e.g. runs/<name>"
        )
    return run_dir


class Run:
    """A trained model and everything known about it, read from its run directory alone."""

    def __init__(self, run_dir: RunDir, config: Config, model: KilnModel, device: torch.device,
                 dataset: Dataset | None = None) -> None:
        self.dir = run_dir
        self.path = run_dir.path
        self.config = config
        self.model = model
        self.device = device
        self.dataset = dataset or open_dataset(config.data, config.seed, run_dir.path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Run:
        run_dir = open_run_dir(path)
        config = load_config(run_dir / RunDir.CONFIG)
        device = torch.device(device)
        dataset = open_dataset(config.data, config.seed, run_dir.path)
        model = build_model(config.blocks, dataset.input_shape).to(device)
        weights = run_dir / RunDir.WEIGHTS
        if not weights.is_file():
            raise RunDirError(
                f"{run_dir.path} has no {RunDir.WEIGHTS}: its training did not finish. Continue it with "
                f"`kiln train {run_dir / RunDir.CONFIG} --out {run_dir.path} --resume`"
            )
        load_weights(weights, model)
        if pick_fuse(config.train.fuse, device)[0]:
            fuse(model)
        model.eval()
        return cls(run_dir, config, model, device, dataset)

    @property
    def manifest(self) -> dict[str, Any]:
        return self.dir.read_json(RunDir.MANIFEST)

    @property
    def metrics(self) -> dict[str, Any]:
        """Final metrics by split, e.g. ``run.metrics["test"]["accuracy"]``."""
        return self.dir.read_json(RunDir.RESULTS)

    @property
    def class_names(self) -> list[str]:
        return list(self.dataset.class_names)

    @property
    def threshold(self) -> float:
        """Binary decision threshold on P(positive class), as chosen on validation in training."""
        return float(self.metrics.get("threshold", 0.5))

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        return model_outputs(self.model, x, self.dataset.to_input, batch_size=self.config.train.eval_batch_size,
                             device=self.device)

    def evaluate(self, split: str = "test", batch_size: int | None = None) -> dict[str, float]:
        if split not in ("train", "val", "test"):
            raise KilnError(f"split must be train, val or test, not {split!r}")
        x, y = self.dataset.load().split(split)
        if len(x) == 0:
            raise KilnError(f"the {split} split of this run is empty (data.val_fraction is 0?)")
        if isinstance(self.dataset, TokenData):
            from kiln.train.text_loop import evaluate_split

            return evaluate_split(self.model, self.dataset, x, y, batch_size or self.config.train.batch_size,
                                  self.device)
        outputs = model_outputs(self.model, x, self.dataset.to_input,
                                batch_size=batch_size or self.config.train.eval_batch_size, device=self.device)
        threshold = self.threshold if self.dataset.task == "binary" else 0.5
        return task_metrics(self.dataset.task, outputs, y, threshold=threshold, target_scale=self.dataset.target_scale)

    def predict(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Class probabilities (N, classes), or for regression values (N,) in the target's units.

        Images: (N, C, H, W) or (N, H, W), uint8 0..255 or float 0..1. Tables: rows as model input (N, features),
        e.g. from :meth:`rows_input`.
        """
        x = torch.as_tensor(x)
        shape = self.dataset.input_shape
        if len(shape) == 3:
            x = self._as_images(x, shape)
        elif x.dim() == 1:
            x = x[None]
        if tuple(x.shape[1:]) != tuple(shape):
            raise KilnError(f"predict expects input of shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
        return self.from_outputs(self.outputs(x))

    def from_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        """Model outputs to what :meth:`predict` returns: class probabilities, or values in the target's units."""
        if self.dataset.task == "regression":
            mean, std = self.dataset.target_scale
            return outputs[:, 0] * std + mean
        return probabilities(outputs)

    @staticmethod
    def _as_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        grey = shape[0] == 1
        if grey and x.dim() == len(shape) - 1:
            x = x[None, None]  # one image (H, W)
        elif grey and x.dim() == len(shape):
            x = x.unsqueeze(1)  # (N, H, W)
        elif x.dim() == len(shape):
            x = x.unsqueeze(0)  # one image (C, H, W)
        if x.is_floating_point():
            x = (x.clamp(0, 1) * PIXEL_SCALE).round().to(torch.uint8)
        return x.to(torch.uint8)

    def predict_files(self, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Read each image or .npy file and predict; one dict per file: file, class, probabilities."""
        images = torch.stack([read_image_file(Path(p), self.dataset.input_shape) for p in paths])
        probs = self.predict(images)
        names = self.class_names
        return [
            {"file": str(p), "class": names[int(row.argmax())], "probability": float(row.max()),
             "probabilities": {n: round(float(v), 6) for n, v in zip(names, row, strict=True)}}
            for p, row in zip(paths, probs, strict=True)
        ]

    # ---- text ------------------------------------------------------------------------------------

    def generate(self, prompt: str, max_new_tokens: int = 200, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop: list[str] | tuple[str, ...] = (),
                 cache: bool = True) -> str:
        """Text a language-model run writes after ``prompt`` (without the prompt). ``temperature=0`` is greedy;
        ``stop`` strings end the text before the first of them; ``cache=False`` recomputes every step."""
        from kiln.generate import Sampling, generate_text

        if not isinstance(self.dataset, Text):
            raise KilnError(f"{self.path} was not trained as a language model (data.dataset: text); "
                            + ("use predict for source -> target runs" if isinstance(self.dataset, TokenData) else
                               "generate needs a text run"))
        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, list(stop))
        return generate_text(self.model, self.dataset.tokenizer, prompt, sampling, cache)

    def translate(self, sources: list[str], cache: bool = True) -> list[str]:
        """Greedy targets for source texts (a ``text_pairs`` run)."""
        from kiln.generate import translate

        if not isinstance(self.dataset, TextPairs):
            raise KilnError(f"{self.path} was not trained on source/target pairs (data.dataset: text_pairs)")
        return translate(self.model, self.dataset, list(sources), self.config.train.eval_batch_size, cache)

    # ---- tables ------------------------------------------------------------------------------------

    def rows_input(self, table: Table) -> torch.Tensor:
        """Raw table rows to model input with the run's saved preprocessing."""
        if not isinstance(self.dataset, Tabular):
            raise KilnError(f"{self.path} was trained on {self.config.data.dataset}, not a table; "
                            "give it images or .npy files")
        return self.dataset.prep.transform(table)

    def predict_table(self, table: Table) -> list[dict[str, Any]]:
        """One dict per row: ``prediction`` and, for classification, ``probability_<class>`` per class.
        A binary prediction is the positive class when its probability reaches the run's threshold."""
        out = self.predict(self.rows_input(table))
        if self.dataset.task == "regression":
            return [{"prediction": float(v)} for v in out]
        names = self.class_names
        results = []
        for row in out:
            if self.dataset.task == "binary":
                label = names[1] if float(row[1]) >= self.threshold else names[0]
            else:
                label = names[int(row.argmax())]
            results.append({"prediction": label,
                            **{f"probability_{n}": round(float(v), 6) for n, v in zip(names, row, strict=True)}})
        return results

    def predict_rows(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Predictions for raw rows as a client sends them (column name -> value)."""
        return self.predict_table(rows_to_table(rows))

    def predict_csv(self, path: str | Path) -> str:
        """A CSV or Parquet file's rows as CSV text, with the prediction columns appended."""
        table = read_table(Path(path))
        predictions = self.predict_table(table)
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        names = list(table.columns)
        writer.writerow(names + list(predictions[0]) if predictions else names)
        for i, extra in enumerate(predictions):
            writer.writerow([table.columns[n][i] or "" for n in names] + list(extra.values()))
        return buffer.getvalue()
