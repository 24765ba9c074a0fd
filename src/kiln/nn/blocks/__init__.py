"""Every block module registers itself in ``kiln.registry.BLOCKS`` on import."""

from kiln.nn.blocks import (
    adapters, conv, dense, heads, language, recommend, recurrent, residual, tabular, transformer,
)

__all__ = ["adapters", "conv", "dense", "heads", "language", "recommend", "recurrent", "residual", "tabular",
           "transformer"]
