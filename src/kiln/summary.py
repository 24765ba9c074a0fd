"""The layer table of a model: each block, its output shape, parameters and multiply-adds."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from kiln.config import Config
from kiln.data.kind import open_kind, resolve
from kiln.nn import KilnModel, build_model
from kiln.nn.base import Shape, kind_of


def model_of(cfg: Config) -> KilnModel:
    """The model a config builds, with what its data decides filled in (the data's files are read for that)."""
    kind = open_kind(cfg.data, cfg.seed)
    return build_model(resolve(cfg, kind).blocks, kind.input_shape)


def _shape(shape: Shape) -> str:
    return f"{kind_of(shape)} {tuple(shape)}"


def summary_table(model: KilnModel, title: str) -> Table:
    table = Table(title=title)
    table.add_column("#", justify="right")
    table.add_column("block")
    table.add_column("output shape")
    table.add_column("parameters", justify="right")
    table.add_column("multiply-adds", justify="right")
    table.add_row("", "input", _shape(model.input_shape), "", "")
    for layer in model.layers:
        table.add_row(str(layer.index), layer.type, _shape(layer.out_shape), f"{layer.params:,}", f"{layer.macs:,}")
    params = sum(p.numel() for p in model.parameters())
    macs = sum(layer.macs for layer in model.layers)
    table.add_section()
    table.add_row("", "total", "", f"{params:,}", f"{macs:,}")
    return table


def print_summary(model: KilnModel, title: str, console: Console | None = None) -> None:
    (console or Console()).print(summary_table(model, title))
