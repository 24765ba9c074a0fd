"""Evaluation of a classifier over whole in-memory splits: loss and accuracy."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kiln.data.images import to_model_input


@torch.inference_mode()
def evaluate_split(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int,
                   device: torch.device, precision=None) -> dict[str, float]:
    """Mean cross-entropy and accuracy over ``x`` (stored uint8 images) in large batches."""
    if len(x) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb = to_model_input(x[start:start + batch_size].to(device))
        yb = y[start:start + batch_size].to(device)
        with precision.autocast() if precision is not None else contextlib.nullcontext():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = len(x)
    return {"loss": loss_sum.item() / n, "accuracy": correct.item() / n, "samples": n}


@torch.inference_mode()
def predict_proba(model: torch.nn.Module, x: torch.Tensor, *, batch_size: int, device: torch.device) -> torch.Tensor:
    """Class probabilities (N, classes) for stored uint8 images (N, C, H, W)."""
    model.eval()
    out = [torch.softmax(model(to_model_input(x[s:s + batch_size].to(device))).float(), dim=1).cpu()
           for s in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)
