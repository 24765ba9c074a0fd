"""Explanations of a run's predictions (``kiln explain``, ``Run.explain``) with Captum: see :mod:`kiln.explain.explain`."""

from kiln.explain.explain import explain, explain_global, explain_model
from kiln.explain.methods import METHODS, attribute

__all__ = ["METHODS", "attribute", "explain", "explain_global", "explain_model"]
