"""What a task trains on: its loss, and what a step counts for the progress line (right answers out of how many).

- classification (multiclass, binary): cross-entropy, optionally class-weighted and label-smoothed; a sample is
  right when its largest logit is its class.
- multilabel: binary cross-entropy of each label's own logit (a sigmoid per label); the progress line counts
  label decisions (logit > 0 against the 0/1 target)
- ranking (recommendation): cross-entropy of the true item (candidate 0) among sampled ones (a sampled softmax);
  a sample is right when the true item scores highest.
- regression: mean squared error of the standardised target; nothing counts as right.
- forecast: mean squared error of the scaled target over every forecast step; nothing counts as right.
- tokens (lm, seq2seq): cross-entropy over every target token that is not padding (``IGNORE``); a token is right
  when it is the most likely one.

An ensemble (``ensemble_mlp``) gives in training one prediction per member, logits with one more dimension
after the batch, (B, k, ...): each member is scored against the same targets, the loss is the mean of the members'
losses, the progress line counts each member's answers, and a sample's own loss is its mean over the members.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.data.text import IGNORE

TOKEN_TASKS = ("lm", "seq2seq")


class Objective:
    def __init__(self, task: str, class_weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        self.task = task
        self.class_weight = class_weight
        self.label_smoothing = label_smoothing

    def members(self, logits: torch.Tensor, y: torch.Tensor) -> int:
        """How many members' predictions ``logits`` hold: k for (B, k, ...) logits, 0 for one prediction."""
        per_sample = 0 if self.task in ("multilabel", "forecast") else 1  # logit dims beyond the target's
        return logits.shape[1] if logits.dim() == y.dim() + per_sample + 1 else 0

    def _flat(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Members' logits (B, k, ...) as (B * k, ...) rows, each with its sample's target."""
        k = self.members(logits, y)
        if not k:
            return logits, y, 0
        return logits.flatten(0, 1), y.repeat_interleave(k, 0), k

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The mean loss of a batch (float32 logits); members' logits: the mean of the members' losses. ``weight``
        (classification): each sample's weight (train.fairness), the loss then their weighted mean."""
        logits, y, k = self._flat(logits, y)
        if weight is not None:
            return self._weighted(logits, y, weight.repeat_interleave(k, 0) if k else weight)
        if self.task == "regression":
            return F.mse_loss(logits[:, 0], y)
        if self.task == "forecast":
            return F.mse_loss(logits, y)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, y)
        if self.task in TOKEN_TASKS:
            return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE)
        return F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.label_smoothing)

    def mass(self, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """What a batch's loss is a weighted mean over, where that is not the count ``counts`` gives: the summed
        sample weights (train.fairness) times class weights (train.class_weights); None for a plain mean. Several
        processes (kiln.training.distributed) share a batch's loss in proportion to it."""
        if (weight is None and self.class_weight is None) or self.task not in ("binary", "multiclass"):
            return None
        w = weight if weight is not None else torch.ones(len(y), device=y.device)
        return (w * self.class_weight[y]).sum() if self.class_weight is not None else w.sum()

    def _weighted(self, logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum(w_i l_i) / sum(w_i c_i) with c_i the class weight of sample i: the plain loss when every w_i is 1."""
        losses = F.cross_entropy(logits, y, weight=self.class_weight, label_smoothing=self.label_smoothing,
                                 reduction="none")
        scale = w * self.class_weight[y] if self.class_weight is not None else w
        return (w * losses).sum() / scale.sum()

    def counts(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | int]:
        """(right answers, how many were counted): samples, or for tokens the targets that are not padding. Both
        stay on the device: reading them forces a sync."""
        logits, y, _ = self._flat(logits, y)
        if self.task in ("regression", "forecast"):
            return torch.zeros((), dtype=torch.long, device=y.device), len(y)
        if self.task == "multilabel":
            return ((logits > 0) == (y > 0.5)).sum(), y.numel()
        if self.task in TOKEN_TASKS:
            keep = y != IGNORE
            return ((logits.argmax(-1) == y) & keep).sum(), keep.sum()
        return (logits.argmax(1) == y).sum(), len(y)

    def sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Each sample's own loss (unweighted, unsmoothed): how hard the sample still is (train.hard_examples)."""
        flat, flat_y, k = self._flat(logits, y)
        losses = self._sample_losses(flat, flat_y)
        return losses.view(len(y), k).mean(1) if k else losses

    def _sample_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "regression":
            return (logits[:, 0] - y).square()
        if self.task == "forecast":
            return (logits - y).square().mean(1)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(1)
        return F.cross_entropy(logits, y, reduction="none")
