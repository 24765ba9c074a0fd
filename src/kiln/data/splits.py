"""Train / validation / test splits held in memory, and the seeded ways of drawing them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Splits:
    """Whole splits resident in memory: inputs as stored (uint8 images, float table rows, token ids); targets are
    class indices (int64), standardised values (float32, regression) or token ids."""

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


def stratified_holdout(labels: list, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`holdout`, but each label keeps its share in both parts (round(n_label * fraction) held out)."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for label in sorted(set(labels), key=str):
        idx = torch.tensor([i for i, v in enumerate(labels) if v == label])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = round(len(idx) * fraction)
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values


def stratified_folds(labels: list, k: int, seed: int) -> list[torch.Tensor]:
    """``k`` disjoint test folds covering every index; each label is dealt round-robin so folds keep its share.
    With ``labels`` all equal this is a plain shuffled k-fold."""
    gen = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.int64)
    dealt = 0
    for label in sorted(set(labels), key=str):
        idx = torch.tensor([i for i, v in enumerate(labels) if v == label])
        idx = idx[torch.randperm(len(idx), generator=gen)]
        fold_of[idx] = (torch.arange(len(idx)) + dealt) % k
        dealt += len(idx)
    return [torch.nonzero(fold_of == f).flatten() for f in range(k)]


def stratified_rows(strata: list, test_fraction: float, val_fraction: float, seed: int,
                    folds: int | None = None, fold: int = 0) -> tuple[list[int], list[int], list[int]]:
    """Row indices (train, val, test), each stratum keeping its share: the test rows are fold ``fold`` of
    ``folds`` stratified folds, else a held-out ``test_fraction``; validation is ``val_fraction`` of the rest."""
    if folds:
        test = stratified_folds(strata, folds, seed)[fold]
        keep = torch.ones(len(strata), dtype=torch.bool)
        keep[test] = False
        rest = torch.nonzero(keep).flatten()
    else:
        rest, test = stratified_holdout(strata, test_fraction, seed)
    part, val = stratified_holdout([strata[i] for i in rest], val_fraction, seed + 1)
    return rest[part].tolist(), rest[val].tolist(), test.sort().values.tolist()
