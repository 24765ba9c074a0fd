"""Data sets by name: each loads into memory and splits train / validation / test deterministically.

A data set is opened from the config's ``data`` section (and, after training, from the run directory,
which holds whatever the data set fitted, such as a table's preprocessing). It tells the model builder
the input shape, the task and the class names, and turns stored samples into model input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.data import mnist
from kiln.data.images import to_model_input
from kiln.nn.base import Shape
from kiln.registry import DATASETS


@dataclass
class Splits:
    """Whole splits resident in memory: inputs as stored (uint8 images, float table rows); targets are class
    indices (int64) or, for regression, float32 values."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    checksums: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


class Dataset:
    """What every data set provides. Subclasses register under the name ``data.dataset`` uses."""

    task: str = "multiclass"  # multiclass | binary | regression
    input_shape: Shape
    class_names: list[str]

    def __init__(self, cfg, seed: int, run_path: Path | None = None) -> None:
        self.cfg, self.seed = cfg, seed

    def block_fields(self) -> dict[str, dict[str, Any]]:
        """Block fields the data decides, by block type (filled in where the config leaves them unset)."""
        return {"classifier": {"classes": len(self.class_names)}}

    def load(self, progress=None) -> Splits:
        raise NotImplementedError

    @property
    def target_scale(self) -> tuple[float, float]:
        """(mean, std) that turn a standardised regression target back into its own units."""
        return (0.0, 1.0)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples (a batch) to the float tensor the model reads."""
        return x.to(torch.float32)

    def save(self, run_path: Path) -> None:
        """Write what the run directory needs to reopen this data set without the training data."""

    def report(self) -> list[str]:
        """Lines for the training log describing what was inferred from the data."""
        return []


def holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): a random ``fraction`` of ``n`` held out, the same for the same seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * fraction)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def stratified_holdout(labels: list, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`holdout`, but each label keeps its share in both parts (round(n_label * fraction) held out)."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for label in sorted(set(labels), key=str):
        idx = torch.tensor([i for i, v in enumerate(labels) if v == label])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def stratified_folds(labels: list, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint test folds covering every index; each label is dealt round-robin so folds keep its share.
    With ``labels`` all equal this is a plain shuffled k-fold."""
    gen = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.int64)
    dealt = 0
    for label in sorted(set(labels), key=str):
        idx = torch.tensor([i for i, v in enumerate(labels) if v == label])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold_of[idx] = (torch.arange(len(idx)) + dealt) % k
        dealt += len(idx)
    return [torch.nonzero(fold_of == f).flatten() for f in range(k)]


@DATASETS.register("mnist")
class Mnist(Dataset):
    input_shape = (1, 28, 28)
    classes = 10
    class_names = [str(d) for d in range(10)]

    def load(self, progress=None) -> Splits:
        cfg = self.cfg
        arrays = mnist.load_mnist(cfg.root, download=cfg.download, progress=progress)
        x, y = arrays.train_images, arrays.train_labels
        if cfg.limit_train:
            x, y = x[: cfg.limit_train], y[: cfg.limit_train]
        tx, ty = arrays.test_images, arrays.test_labels
        if cfg.limit_test:
            tx, ty = tx[: cfg.limit_test], ty[: cfg.limit_test]
        tr, va = holdout(len(x), cfg.val_fraction, self.seed)
        return Splits(x[tr].unsqueeze(1), y[tr], x[va].unsqueeze(1), y[va], tx.unsqueeze(1), ty,
                      dict(arrays.checksums))

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x)


def open_dataset(data_cfg, seed: int, run_path: Path | None = None) -> Dataset:
    """The data set ``data_cfg.dataset`` names; ``run_path`` reopens it as a finished run saved it.

    Its splits use ``data.split_seed`` when set, else the run's seed: varying the seed alone then
    varies initialisation and order while every run keeps the same validation samples."""
    import kiln.data.tabular  # noqa: F401  (registers "tabular")
    import kiln.data.text  # noqa: F401  (registers "text" and "text_pairs")

    split_seed = seed if data_cfg.split_seed is None else data_cfg.split_seed
    return DATASETS.get(data_cfg.dataset)(data_cfg, split_seed, run_path)
