"""kiln: describe a model and its data in one YAML file; train, evaluate and predict with it.

The names below load on first use, so that ``kiln --help`` and other light commands never import PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiln.errors import ConfigError, DataError, KilnError, RunDirError
from kiln.version import __version__

__all__ = ["Config", "ConfigError", "DataError", "KilnError", "Run", "RunDirError", "__version__", "load_config",
           "lr_find", "train", "tune"]

_LAZY = {"Config": "kiln.config", "load_config": "kiln.config", "Run": "kiln.run", "lr_find": "kiln.lrfind"}

if TYPE_CHECKING:
    from kiln.config import Config, load_config
    from kiln.lrfind import lr_find
    from kiln.run import Run


def train(config, overrides=None, **options) -> Run:
    """Train a model from a config (a YAML path, a dict or a Config) and return the finished :class:`Run`.
    See :func:`kiln.api.train` for the options."""
    from kiln.api import train as train_run

    return train_run(config, overrides, **options)


def tune(config, space, trials: int, **options) -> dict:
    """Search ``config``'s hyperparameters over ``space`` with Optuna for ``trials`` trials; returns the summary.
    See :func:`kiln.tuning.tune` for the options."""
    from kiln.tuning import tune as tune_study

    return tune_study(config, space, trials, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
