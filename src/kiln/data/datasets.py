"""Data sets by name: each loads into memory and splits train / validation / test deterministically."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kiln.data import mnist
from kiln.registry import DATASETS


@dataclass
class Splits:
    """Whole splits resident in memory: inputs as stored (uint8 images), labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    checksums: dict[str, str] = field(default_factory=dict)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"{name}_x"), getattr(self, f"{name}_y")


def holdout(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val): a random ``fraction`` of ``n`` held out, the same for the same seed."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * fraction)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


@DATASETS.register("mnist")
class Mnist:
    input_shape = (1, 28, 28)
    classes = 10
    class_names = [str(d) for d in range(10)]

    @staticmethod
    def load(cfg, seed: int, progress=None) -> Splits:
        arrays = mnist.load_mnist(cfg.root, download=cfg.download, progress=progress)
        x, y = arrays.train_images, arrays.train_labels
        if cfg.limit_train:
            x, y = x[: cfg.limit_train], y[: cfg.limit_train]
        tx, ty = arrays.test_images, arrays.test_labels
        if cfg.limit_test:
            tx, ty = tx[: cfg.limit_test], ty[: cfg.limit_test]
        tr, va = holdout(len(x), cfg.val_fraction, seed)
        return Splits(x[tr].unsqueeze(1), y[tr], x[va].unsqueeze(1), y[va], tx.unsqueeze(1), ty,
                      dict(arrays.checksums))


def get_dataset(name: str):
    return DATASETS.get(name)
