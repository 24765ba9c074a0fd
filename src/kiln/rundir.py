"""The files of a run directory: their names, and reading and writing them. Everything after training reads
a run from here alone, so a run trained on one machine serves on another.

Layout of ``runs/<name>/``::

    config.yaml                   resolved config: trains again as it is
    manifest.json                 versions, seed, device, precision, data checksums, status
    metrics.jsonl                 one JSON object per progress line, evaluation and the final test
    checkpoints/last.safetensors  weights + optimiser, scheduler, RNG and data-order state (resume)
    checkpoints/best.safetensors  weights of the best validation epoch
    model.safetensors             final weights (best epoch when early stopping restores it)
    results.json                  final train / val / test metrics (and a binary task's decision threshold)
    precision_recall.svg          binary classification: the test split's precision-recall curve
    transfer.json                 train.init_from / train.freeze: what was loaded, new, skipped and frozen
    lr_find.json, lr_find.png     train.optimizer.lr: auto: the learning-rate sweep and the rate chosen
    model.onnx, model.pt2         written by `kiln export`
    audit.json, audit.svg         written by `kiln audit`; fairness.json: its per-group thresholds
    explanations/                 written by `kiln explain`: per input <name>.<method>.json and .png/.svg/.html
    compression.json              a run `kiln compress` wrote: each step and what it measured
    model.int8.onnx               a quantized run's model (`kiln compress --quantize`): it predicts with this graph
    hf/                           `kiln export --format hf`: config.json, model.safetensors, tokenizer files

and the files its kind of data adds (a table's ``preprocessing.json``, a text's ``tokenizer.json``: each
kind lists them in ``run_files``). Every file is written atomically. This module imports nothing of kiln
above it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import RunDirError
from kiln.fsutil import atomic_write_text


class RunDir:
    CONFIG = "config.yaml"
    MANIFEST = "manifest.json"
    METRICS = "metrics.jsonl"
    RESULTS = "results.json"
    PR_CURVE = "precision_recall.svg"
    TRANSFER = "transfer.json"
    LR_FIND = "lr_find.json"
    LR_FIND_PLOT = "lr_find.png"
    WEIGHTS = "model.safetensors"
    LAST = "checkpoints/last.safetensors"
    BEST = "checkpoints/best.safetensors"
    ONNX = "model.onnx"
    TORCH_EXPORT = "model.pt2"
    AUDIT = "audit.json"  # kiln audit: per-group figures with intervals, and audit.svg, its plot
    AUDIT_PLOT = "audit.svg"
    FAIRNESS = "fairness.json"  # per-group decision thresholds (kiln audit --fit-thresholds)
    EXPLANATIONS = "explanations"  # kiln explain: a JSON and a picture per input, global.<method>.json/.svg
    INT8_ONNX = "model.int8.onnx"  # a quantized run's model (kiln compress): model input -> raw outputs
    COMPRESSION = "compression.json"  # what kiln compress did and measured, in the run it wrote
    HF_EXPORT = "hf"  # `kiln export --format hf`: a Hugging Face GPT-2 folder
    # What serving a run reads, besides its kind's own files.
    SERVING = (CONFIG, MANIFEST, RESULTS, WEIGHTS)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        """The path of the run's file ``name``. A run directory holds its own files only: a symbolic link in it
        (a results.json pointing at a secret elsewhere) is refused, so nothing is read, served or copied into a
        deploy folder through one."""
        path = self.path
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise RunDirError(f"{path} is a symbolic link; kiln reads a run directory's own files only, never "
                                  "through a link: copy the file there instead")
        return path

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

    def resume_hint(self) -> str:
        return f"kiln train {self / self.CONFIG} --out {self.path} --resume"

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

    def remove_leftovers(self) -> list[Path]:
        """Delete the temporary files of writes a kill interrupted (``atomic_write`` names them ``.<name>.*.tmp``)."""
        leftovers = [p for folder in (self.path, self.path / "checkpoints") if folder.is_dir()
                     for p in folder.glob(".*.tmp") if p.is_file() and not p.is_symlink()]
        for p in leftovers:
            p.unlink()
        return leftovers

    def clear_metrics(self) -> None:
        atomic_write_text(self / self.METRICS, "")

    def keep_metrics_until(self, step: int) -> None:
        """On resume: drop records written after the checkpoint we continue from."""
        kept = [r for r in self.read_metrics() if r.get("step", 0) <= step and r.get("kind") != "test"]
        atomic_write_text(self / self.METRICS, "".join(json.dumps(r) + "\n" for r in kept))


def open_run_dir(path: str | Path) -> RunDir:
    """The run directory at ``path``, or a RunDirError saying why it is not one."""
    run_dir = RunDir(path)
    if not run_dir.path.is_dir():
        raise RunDirError(f"{run_dir.path} is not a directory; give the folder a `kiln train` run wrote")
    if not run_dir.is_run():
        raise RunDirError(
            f"{run_dir.path} is not a kiln run directory (it has no {RunDir.MANIFEST} and {RunDir.CONFIG}); "
            "give the folder a `kiln train` run wrote, e.g. runs/<name>"
        )
    return run_dir
