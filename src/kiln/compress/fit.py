"""Training a compressed model into a new run directory with kiln's own trainer: fine-tuning a pruned model from
its pruned weights, or training a student on a teacher's soft targets (knowledge distillation). The run written is
a run like any other (config, metrics, checkpoints, manifest, results)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kiln.data.kind import DataKind
from kiln.errors import ConfigError
from kiln.fsutil import atomic_write_text
from kiln.nn import KilnModel
from kiln.nn.fuse import fuse
from kiln.rundir import RunDir
from kiln.training.objectives import Objective
from kiln.training.precision import pick_device, pick_fuse, pick_precision
from kiln.training.progress import TrainProgress
from kiln.training.session import finish_run, run_manifest
from kiln.training.threads import pick_threads
from kiln.training.trainer import Trainer


class DistillObjective:
    """Hinton et al.'s knowledge distillation: ``alpha`` x T^2 x KL(teacher's softened classes || student's) plus
    (1 - ``alpha``) x the task's own loss on the hard labels. The teacher reads the same (augmented) model input
    as the student: ``inputs`` holds the batch the student's forward pass was just given."""

    def __init__(self, base: Objective, teacher: torch.nn.Module, temperature: float, alpha: float) -> None:
        self.base, self.teacher, self.temperature, self.alpha = base, teacher, temperature, alpha
        self.inputs: torch.Tensor | None = None

    def remember(self, module, args) -> None:  # a forward pre-hook on the student
        if module.training:
            self.inputs = args[0]

    def loss(self, logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        hard = self.base.loss(logits, y, weight)  # weight: train.fairness's sample weights, on the hard labels
        with torch.no_grad():
            teacher = self.teacher(self.inputs).float()
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1), log_target=True,
                        reduction="batchmean") * t * t
        return self.alpha * soft + (1 - self.alpha) * hard

    def __getattr__(self, name: str):  # counts, sample_losses, members: the task's own
        return getattr(self.base, name)


def train_into(cfg, run_dir: RunDir, kind: DataKind, model: KilnModel, *, live: bool | None = None,
               objective: Callable[[Objective], object] | None = None, execution: dict | None = None) -> KilnModel:
    """Train ``model`` (built from ``cfg.blocks``, weights as given) for ``cfg.train.epochs`` into the new run
    ``run_dir``; ``objective`` wraps the task's objective (distillation). Returns the trained model (eval mode)."""
    before = torch.get_num_threads()
    threads, threads_reason = pick_threads(cfg.train.threads)
    torch.set_num_threads(threads)
    try:
        device = pick_device(cfg.train.device)
        precision = pick_precision(cfg.train.precision, device)
        model = model.to(device)
        use_fuse, fuse_reason = pick_fuse(cfg.train.fuse, device)
        fused = {"fuse": fuse(model) if use_fuse else [], "fuse_reason": fuse_reason}
        run_dir.check_new()
        display = TrainProgress(cfg.train.epochs, live=live)
        data = kind.load(progress=display.log)
        if len(data.train_x) == 0:
            raise ConfigError("data: the training split is empty")
        trainer = Trainer(cfg, run_dir, kind, data, model, device, precision, display)
        hook = None
        if objective is not None:
            trainer.objective = objective(trainer.objective)
            hook = model.register_forward_pre_hook(trainer.objective.remember)
        run_dir.create()
        kind.save(run_dir.path)
        atomic_write_text(run_dir / RunDir.CONFIG, cfg.to_yaml())
        manifest = run_manifest(cfg, data, device, precision, model, fused | (execution or {}))
        run_dir.write_json(RunDir.MANIFEST, manifest | {"threads_reason": threads_reason})
        display.log(f"training {cfg.name}: {manifest['parameters']:,} parameters, {trainer.plan.describe()}, "
                    f"{threads} threads")
        try:
            trainer.fit()
        finally:
            if hook is not None:
                hook.remove()
        finish_run(cfg, trainer, manifest)
        return model.eval()
    finally:
        torch.set_num_threads(before)
