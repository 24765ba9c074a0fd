"""Model code: blocks and the builder. Knows nothing of training."""

from kiln.nn.build import KilnModel, build_model, next_block

__all__ = ["KilnModel", "build_model", "next_block"]
