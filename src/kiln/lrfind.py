"""``kiln lr-find CONFIG``: sweep the learning rate on the config's model and training data, plot the loss
against the rate (PNG), and suggest a rate. No run is written: only the plot and its JSON, where asked
(default: beside the config, ``<config>.lr_find.png`` and ``.json``). The sweep is
:mod:`kiln.training.lr_find`, the one ``train.optimizer.lr: auto`` runs before training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kiln.config import load_config
from kiln.errors import KilnError
from kiln.training import lr_find as finder


def outputs(config: str | os.PathLike | dict, out: str | os.PathLike | None) -> tuple[Path, Path]:
    """(PNG, JSON) paths: ``out`` (a .png file, its JSON beside it) or beside the config file."""
    if out is not None:
        png = Path(out)
        if png.suffix.lower() != ".png":
            raise KilnError(f"--out {png}: the plot is a PNG file; give a path ending in .png")
    elif isinstance(config, str | os.PathLike):
        png = Path(config).with_suffix(".lr_find.png")
    else:
        png = Path("lr_find.png")
    if not png.parent.is_dir():
        raise KilnError(f"--out {png}: the folder {png.parent} does not exist")
    return png, png.with_suffix(".json")


def lr_find(config: str | os.PathLike | dict, overrides: dict[str, Any] | list[str] | None = None, *,
            out: str | os.PathLike | None = None, steps: int = finder.STEPS, start: float = finder.START,
            end: float = finder.END, method: str = "min10", live: bool | None = None) -> dict[str, Any]:
    """Run the sweep and write its plot and JSON; return the JSON's content with the paths written."""
    if method not in finder.METHODS:
        raise KilnError(f"unknown method {method!r}; choose {' or '.join(finder.METHODS)}")
    finder.check_range(start, end, steps)
    cfg = load_config(config, overrides)
    if cfg.train.optimizer.lr == "auto":  # the sweep sets the rate itself
        cfg = finder.with_lr(cfg, start)
    png, json_path = outputs(config, out)
    found = finder.sweep_config(cfg, start, end, steps, method, live)
    finder.write_sweep(found, png, json_path, f"{cfg.name}: learning-rate sweep ({found.method})")
    return {**found.to_json(), "plot": str(png), "json": str(json_path)}
