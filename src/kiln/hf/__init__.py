"""Hugging Face checkpoints in and out of kiln: GPT-2 (``kiln import hf-gpt2``, ``kiln export RUN --format hf``)."""

from kiln.hf.convert import export_gpt2, import_gpt2

__all__ = ["export_gpt2", "import_gpt2"]
