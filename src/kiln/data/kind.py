"""What every kind of data provides: the one interface between the rest of kiln and the data.

A kind of data (MNIST's images, tables, text, text pairs, ...) is one module of this package, registered
under the name that ``data.dataset`` uses. It is the single place that knows

- its config fields (``Config``: the ``data`` section of a config file),
- how its data is read, split and preprocessed, and what a run directory keeps of that (``save``,
  ``run_files``) so that everything after training works from the run directory alone,
- the task its models learn (which fixes the head, the loss and the metrics) and the block fields it
  decides (a class count, a vocabulary),
- how stored samples become model input, in training (``gather``, ``to_input``, ``augment``) and in
  evaluation (``eval_batches``),
- how a user's array, a file, a JSON request (``inputs``) or a table row becomes model input, and an output an
  answer (``predict_files``, ``render``, ``decode_batch``).

Training, ``Run``, serving, export, deploy and the CLI ask a kind object; none of them asks which kind it is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from kiln.data.splits import Splits
from kiln.errors import ConfigError, DataError, KilnError
from kiln.nn.base import BlockSpec, Shape
from kiln.registry import KINDS
from kiln.schema import StrictModel

if TYPE_CHECKING:
    from kiln.data.requests import InputAdapter


class DataSpec(StrictModel):
    """The fields of the ``data`` section that every kind has; each kind adds its own."""

    dataset: str
    # The folder with the data files; default: $KILN_DATA, else the download cache.
    root: str | None = Field(default=None, max_length=4096)
    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)  # of the training data, held out for validation
    split_seed: int | None = Field(default=None, ge=0, lt=2**32)  # seed of the splits; default: the run's seed


class DataKind:
    """The interface. A subclass sets the class attributes and overrides what its data needs."""

    Config: ClassVar[type[DataSpec]]
    description: ClassVar[str]  # "image", "table", "text": how messages name a run of this kind
    usage: ClassVar[str]  # what to do with a finished run of this kind (said when a command does not apply)
    run_files: ClassVar[tuple[str, ...]] = ()  # files it adds to a run directory (written by `save`)
    trains_by_steps: ClassVar[bool] = False  # True: train.steps random batches; False: epochs over the samples
    streams: ClassVar[bool] = False  # True: training batches come from the kind's ``stream`` (data not in memory)
    decodes: ClassVar[bool] = False  # answers come from the kind's decode_batch (text decoded step by step, a
    # forecast undone per history), not from a traced forward pass
    input_name: ClassVar[str] = "inputs"  # the name of an exported graph's input
    answers: ClassVar[str] = "task"  # what a served answer is: by the task (classes, values, texts), or "items"
    task: str = "multiclass"  # multiclass | binary | multilabel | regression | lm | seq2seq | forecast | ranking
    input_shape: Shape
    class_names: list[str] = []

    def __init__(self, cfg: DataSpec, seed: int, run_path: Path | None = None) -> None:
        """``cfg`` is the data section, ``seed`` the split seed; ``run_path`` reopens the kind as a finished run
        saved it, without its training data."""
        self.cfg, self.seed = cfg, seed

    # ---- what a run of this kind is --------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.cfg.dataset

    @property
    def target_scale(self) -> tuple[float, float]:
        """(mean, std) that turn a standardised regression target back into its own units."""
        return (0.0, 1.0)

    @property
    def target_name(self) -> str | None:
        """The name of what a regression predicts, for answers that describe themselves."""
        return None

    def block_fields(self) -> dict[str, dict[str, Any]]:
        """Block fields the data decides, by block type (filled in where the config leaves them unset)."""
        return {"classifier": {"classes": len(self.class_names)}}

    def auto_fields(self) -> dict[str, dict[str, Any]]:
        """Block fields the data decides where the config says ``auto`` (a table encoder's numeric embedding), by
        block type, so the run's config.yaml holds the value used; nothing for most kinds."""
        return {}

    def data_fields(self) -> dict[str, Any]:
        """``data`` fields the data decides where the config said ``auto`` (a table's ``bins``), so the run's
        config.yaml holds the value used; nothing for most kinds."""
        return {}

    def check_model(self, specs: list[BlockSpec]) -> None:
        """Refuse, before anything is written, a model this kind of data cannot train."""

    def fill_model(self, model: torch.nn.Module) -> None:
        """Put what the data fixes into a newly built model before training (e.g. items' side features, which
        are then saved with the weights); nothing for most kinds."""

    def report(self) -> list[str]:
        """Lines for the training log describing what was read and inferred."""
        return []

    # ---- data --------------------------------------------------------------------------------------

    def load(self, progress=None) -> Splits:
        raise NotImplementedError

    def column_values(self, split: str, name: str) -> list[str | None]:
        """The raw values of column ``name`` (any column of the data, trained on or not) for the samples of
        ``split`` (train, val or test), in the split's order: what a fairness audit or reweighing groups rows by.
        Only kinds whose samples are table rows have columns."""
        raise DataError(f"{self.description} data has no columns; fairness groups come from a table's columns "
                        "(data.dataset: tabular)")

    def save(self, run_path: Path) -> None:
        """Write ``run_files``: what the run directory needs to reopen this kind without the training data."""

    def samples(self, x: torch.Tensor) -> int:
        """How many training samples a stored split holds (what a batch draws indices from)."""
        return len(x)

    def gather(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored samples ``idx`` of a split and their targets."""
        return x[idx], y[idx]

    def eval_batches(self, x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A whole split once, in batches of at most ``size`` samples (stored inputs, targets)."""
        for start in range(0, len(x), size):
            yield x[start:start + size], y[start:start + size]

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples (a batch) to the tensor the model reads."""
        return x.to(torch.float32)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random training-time changes of model input (none unless the kind has them)."""
        return x

    def metrics(self, xs: list[torch.Tensor], outputs: torch.Tensor, y: torch.Tensor) -> dict[str, Any] | None:
        """The kind's own metrics of a whole split (``xs``: its stored input batches in order; outputs and
        targets), or None for the task's standard ones."""
        return None

    def shown(self, split: str, x: torch.Tensor, idx: list[int]) -> list[dict[str, Any]]:
        """How a report shows the stored samples ``idx`` of split ``split`` (``x``: that split as ``load`` gave it),
        each ``{"image": uint8 array (H, W) or (H, W, C)}``, ``{"row": {column: value as read}}`` or
        ``{"text": str}``; ``{}`` for a kind that has no way to show one."""
        return [{} for _ in idx]

    def exact_matches(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int | None:
        """How many samples the model's greedy output gets entirely right, for kinds with such a metric."""
        return None

    # ---- inference ---------------------------------------------------------------------------------

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """A user's array (``Run.predict``) as a batch of stored samples (a text kind also takes texts)."""
        return x[None] if x.dim() == len(self.input_shape) else x

    def standalone(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples as inputs that stand on their own, what an exported graph takes: the samples themselves,
        unless they are references into data the kind holds (a time series' window origins)."""
        return x

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """``n`` random stored inputs of the right dtype and range (checking an export without data)."""
        raise NotImplementedError

    def inputs(self) -> InputAdapter:
        """The adapter that turns a served request's JSON instances (or uploaded files) into one batch."""
        raise KilnError(f"serving {self.description} runs is not supported")

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Predictions for files (`kiln predict`), one record per input."""
        raise KilnError(f"{run.path} is a {self.description} run; {self.usage}")

    def render(self, records: list[dict[str, Any]]) -> str:
        """``predict_files``' records as the text `kiln predict` prints."""
        raise NotImplementedError

    def decode_batch(self, run, batch: np.ndarray) -> np.ndarray:
        """For kinds that ``decodes``: the answers to one served batch (texts)."""
        raise NotImplementedError

    # ---- explanations (kiln explain) ---------------------------------------------------------------

    # What an attribution is drawn over: "image" (a map over the pixels), "columns" (one value per named column,
    # see ``feature_groups``) or "tokens" (one value per token); None: explanations do not apply to this kind.
    explains: ClassVar[str | None] = None

    def explain_inputs(self, paths: list[str | Path]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Stored samples (N, ...) read from files as `kiln predict` reads them, and for each a record naming it:
        ``name`` (a file-name stem for its outputs) and what a reader should see (``file``, a row's ``values``, a
        text's ``tokens``)."""
        raise KilnError(f"explanations of {self.description} runs are not supported")

    def explain_baseline(self, x: torch.Tensor) -> torch.Tensor:
        """The reference that attributions are measured from, as model input of ``x``'s shape: what "absent" means
        for the data (black pixels, padding, a table's training means and unknown categories)."""
        return torch.zeros_like(x)

    def feature_groups(self) -> list[tuple[str, list[int]]] | None:
        """Named groups of model-input positions that a reader thinks of as one feature (a table's column: its
        piecewise-linear bins and is-missing flag together), or None: each position alone."""
        return None


HEADS = {"classifier": ("binary", "multiclass", "multilabel"), "regressor": ("regression",),  # the head of each task
         "forecaster": ("forecast",)}


def resolve(cfg, kind: DataKind):
    """``cfg`` (a Config) with what the data decides filled in (class count, a table's column layout, a
    vocabulary), so the saved config is complete; refuses a head that does not fit the kind's task."""
    fill, auto = kind.block_fields(), kind.auto_fields()
    blocks = []
    for i, b in enumerate(cfg.model.blocks):
        if b.type in HEADS and kind.task not in HEADS[b.type]:
            head = next(h for h, tasks in HEADS.items() if kind.task in tasks)
            raise ConfigError(f"model.blocks.{i} ({b.type}): the task is {kind.task}; end the model with `{head}`")
        decided = fill.get(b.type, {})
        for k, v in decided.items():
            if getattr(b, k) is not None and getattr(b, k) != v:
                raise ConfigError(f"model.blocks.{i}.{k}: {b.type} has {k} {getattr(b, k)!r} but the data gives "
                                  f"{v!r}; leave it unset to take the data's")
        unset = {k: v for k, v in decided.items() if getattr(b, k) is None}
        unset |= {k: v for k, v in auto.get(b.type, {}).items() if getattr(b, k) == "auto"}
        blocks.append(b.model_copy(update=unset) if unset else b)
    update = {"model": cfg.model.model_copy(update={"blocks": blocks})}
    if data := kind.data_fields():
        update["data"] = cfg.data.model_copy(update=data)
    return cfg.model_copy(update=update)


def find_data(path: str | None, root: str | None, what: str) -> Path:
    """``data.path`` as given when it exists, else under ``root``, else under $KILN_DATA."""
    if path is None:
        raise ConfigError(f"data.path: give {what} (relative to data.root, the current directory or $KILN_DATA)")
    given = Path(path).expanduser()
    candidates = [given] if given.is_absolute() else [
        *([Path(root).expanduser() / given] if root else []),
        given,
        *([Path(os.environ["KILN_DATA"]) / given] if os.environ.get("KILN_DATA") else []),
    ]
    for candidate in candidates:
        if candidate.is_file() or candidate.is_dir():
            return candidate
        if candidate.exists():  # a device, a pipe, a socket: /dev/zero would be read for ever
            raise DataError(f"data.path {path!r}: {candidate} is not a regular file or folder")
    raise DataError(f"data.path {path!r}: not found (looked at {', '.join(map(str, candidates))}); give {what} "
                    "relative to data.root, the current directory or $KILN_DATA")


def kind_class(name: str) -> type[DataKind]:
    """The kind registered as ``name`` (kinds register when ``kiln.data`` is imported, as kiln.config does)."""
    return KINDS.get(name)


def open_kind(data_cfg: DataSpec, seed: int, run_path: Path | None = None) -> DataKind:
    """The kind ``data_cfg.dataset`` names; ``run_path`` reopens it as a finished run saved it.

    Its splits use ``data.split_seed`` when set, else the run's seed: varying the seed alone then
    varies initialisation and order while every run keeps the same validation samples."""
    split_seed = seed if data_cfg.split_seed is None else data_cfg.split_seed
    return kind_class(data_cfg.dataset)(data_cfg, split_seed, run_path)
