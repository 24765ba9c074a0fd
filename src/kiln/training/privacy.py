"""Training with differential privacy (DP-SGD, Abadi et al. 2016) through Opacus's parts.

``train.privacy: {epsilon, delta, max_grad_norm}`` makes each step: draw a Poisson batch (every training sample
joins with probability q), compute each sample's own gradient (Opacus's grad-sample hooks), clip each to
``max_grad_norm``, sum, add Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` and divide
by the expected batch size (Opacus's ``DPOptimizer`` around kiln's optimiser). The noise multiplier is the
smallest that keeps the whole planned run within (epsilon, delta); an accountant (PRV by default, RDP on
request) counts what the steps taken spent, which the run's results and manifest record.

kiln draws batches from tensors, not from a DataLoader, so the pieces are used directly: ``GradSampleHooks``
(per-sample gradients without wrapping the model: state-dict keys stay as they are), ``DPOptimizer``,
an accountant and ``get_noise_multiplier``.

- Batches and noise come from the operating system's randomness, not from ``seed``: the seed is written in the
  run's config.yaml, and whoever knew it could re-create the noise and the batches of every step and undo the
  guarantee. A private run therefore does not repeat bit for bit; what it spends does.
- Per-sample gradients need layers that treat each sample alone: batchnorm is refused (use groupnorm or
  layernorm); PyTorch's LSTM, GRU and RNN run as Opacus's DPLSTM/DPGRU/DPRNN (same parameters and state-dict
  keys) and go back to PyTorch's after training. kiln's attention (linear projections and
  ``scaled_dot_product_attention``) needs no swap; Opacus's DPMultiheadAttention is never used (with
  ``batch_first`` it computes something else than nn.MultiheadAttention, opacus#825). kiln's fused C kernels
  (kiln.nn.fuse) compute their own gradients and are off in a private run.
- An empty Poisson batch (opacus#514) still takes its step, noise alone, and counts in the budget; it adds
  nothing to the logged loss.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field, PositiveFloat
from torch import nn

from kiln.errors import ConfigError, RunDirError
from kiln.rundir import RunDir
from kiln.schema import StrictModel
from kiln.training.checkpoint import read_metadata

EXTRA_HINT = "differential privacy needs Opacus: pip install 'kiln[privacy]'"
NORM_FIX = "use groupnorm (images) or layernorm (vectors, sequences) blocks instead"


class PrivacyConfig(StrictModel):
    """``train.privacy``: train with DP-SGD so that the run is (epsilon, delta)-differentially private with respect
    to each sample of its training split."""

    epsilon: PositiveFloat  # the budget for the whole planned run
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)  # keep it below 1 / (training samples)
    max_grad_norm: PositiveFloat = 1.0  # each sample's gradient is clipped to this L2 norm
    accountant: Literal["prv", "rdp"] = "prv"  # PRV (tighter: less noise for the same epsilon) or RDP
    mode: Literal["hooks", "functorch"] = "hooks"  # how per-sample gradients are computed: Opacus's per-layer
    # hooks, or functorch's vmap for every layer
    max_noise_multiplier: PositiveFloat = 10.0  # more noise than this is refused: the model would learn little


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise ConfigError(f"train.privacy: {EXTRA_HINT}") from None
    import opacus.accountants
    import opacus.accountants.utils
    import opacus.grad_sample
    import opacus.layers
    import opacus.optimizers
    return opacus


def epsilon_spent(accountant: str, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """What ``steps`` DP-SGD steps at this noise and sample rate spend, by Opacus's accountant of that name."""
    opacus = _opacus()
    if steps == 0:
        return 0.0
    acc = opacus.accountants.create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # a bound, still valid
        return float(acc.get_epsilon(delta=delta))


def noise_for(p: PrivacyConfig, sample_rate: float, steps: int, plan: str) -> float:
    """The smallest noise multiplier that keeps ``steps`` steps at ``sample_rate`` within (epsilon, delta), or a
    ConfigError naming the smallest epsilon that ``max_noise_multiplier`` reaches and the noise this one needs."""
    opacus = _opacus()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # a bound, still valid
        try:
            sigma = opacus.accountants.utils.get_noise_multiplier(
                target_epsilon=p.epsilon, target_delta=p.delta, sample_rate=sample_rate, steps=steps,
                accountant=p.accountant)
        except ValueError:  # Opacus gives up past a noise multiplier of 1e6
            sigma = math.inf
    if sigma > p.max_noise_multiplier:
        smallest = epsilon_spent(p.accountant, p.max_noise_multiplier, sample_rate, steps, p.delta)
        needed = "more than 1e6" if math.isinf(sigma) else f"{sigma:.3g}"
        raise ConfigError(
            f"train.privacy.epsilon: {p.epsilon:g} cannot be reached in {plan} ({steps} steps at sample rate "
            f"{sample_rate:.3g}): the smallest epsilon reachable there is {smallest:.3g} (at noise multiplier "
            f"{p.max_noise_multiplier:g}, train.privacy.max_noise_multiplier); this epsilon needs a noise multiplier "
            f"of {needed}. Raise epsilon, train fewer epochs, use a smaller batch_size (a lower sample rate) or "
            "raise max_noise_multiplier")
    return sigma


# ---- the model ----------------------------------------------------------------------------------


def _dp_layer(module: nn.Module) -> nn.Module | None:
    """Opacus's DP-compatible copy of a PyTorch recurrent layer (same weights and keys), or None."""
    layers = _opacus().layers
    cls = {nn.LSTM: layers.DPLSTM, nn.GRU: layers.DPGRU, nn.RNN: layers.DPRNN}.get(type(module))
    if cls is not None and getattr(module, "proj_size", 0):
        raise ConfigError("train.privacy: an LSTM with proj_size has no DP-compatible version in Opacus")
    return None if cls is None else _recurrent_copy(module, cls, rnn=type(module) is nn.RNN)


def _torch_layer(module: nn.Module) -> nn.Module | None:
    """PyTorch's recurrent layer with the weights of Opacus's DP copy, or None."""
    layers = _opacus().layers
    cls = {layers.DPLSTM: nn.LSTM, layers.DPGRU: nn.GRU, layers.DPRNN: nn.RNN}.get(type(module))
    return None if cls is None else _recurrent_copy(module, cls, rnn=cls is nn.RNN)


def _recurrent_copy(module: nn.Module, cls: type, rnn: bool) -> nn.Module:
    """A ``cls`` recurrent layer with ``module``'s settings and weights, on its device."""
    kwargs = {"nonlinearity": module.nonlinearity} if rnn else {}
    copy = cls(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
               batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional, **kwargs)
    copy.load_state_dict(module.state_dict())
    return copy.to(next(module.parameters()).device)


def _replace(model: nn.Module, make) -> list[str]:
    """Replace every submodule for which ``make`` gives a new module; return the replaced modules' names."""
    done = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            new = make(child)
            if new is not None:
                setattr(parent, child_name, new)
                done.append(f"{name}.{child_name}" if name else child_name)
    return done


def check_model(model: nn.Module, block_types: list[str]) -> None:
    """Refuse layers whose gradients mix the samples of a batch, naming the block and the fix."""
    for name, module in model.named_modules():
        block = _block_of(name, block_types)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ConfigError(f"{block}: batchnorm mixes the samples of a batch, so per-sample gradients and "
                              f"train.privacy cannot work with it; {NORM_FIX}"
                              + (" (the residual block normalises with batchnorm inside: build the network from "
                                 "conv2d, groupnorm and pooling blocks)" if "residual" in block else ""))
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise ConfigError(f"{block}: instance norm with running statistics mixes samples; {NORM_FIX}")
        if isinstance(module, nn.MultiheadAttention):
            raise ConfigError(f"{block}: nn.MultiheadAttention has no per-sample gradients, and Opacus's "
                              "DPMultiheadAttention computes something else (opacus#825); use kiln's "
                              "transformer blocks")


def _block_of(name: str, block_types: list[str]) -> str:
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "blocks" and parts[1].isdigit() and int(parts[1]) < len(block_types):
        return f"model.blocks.{parts[1]} ({block_types[int(parts[1])]})"
    return f"model ({name or 'top level'})"


# ---- batches ------------------------------------------------------------------------------------


class PoissonBatches(Sequence):
    """One epoch of Poisson batches: at each step every sample joins with probability ``rate`` (so a batch's size
    varies and may be 0), drawn in order from a generator seeded from the operating system."""

    def __init__(self, n: int, rate: float, steps: int, gen: torch.Generator, device: torch.device) -> None:
        self.n, self.rate, self.steps, self.gen, self.device = n, rate, steps, gen, device
        self.last: tuple[int, torch.Tensor] | None = None  # the trainer asks for a step's batch twice

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        if self.last is None or self.last[0] != step:
            chosen = torch.rand(self.n, generator=self.gen) < self.rate
            self.last = (step, chosen.nonzero().squeeze(1).to(self.device))
        return self.last[1]


def _secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


# ---- training -----------------------------------------------------------------------------------


class Privacy:
    """DP-SGD for one Trainer: made before its optimiser (it swaps layers), then ``wrap`` the optimiser."""

    def __init__(self, trainer) -> None:
        opacus = _opacus()
        self.tr, self.cfg = trainer, trainer.t.privacy
        check_settings(trainer)
        n = trainer.kind.samples(trainer.train_x)
        self.steps_per_epoch = math.ceil(n / trainer.t.batch_size)
        self.sample_rate = 1.0 / self.steps_per_epoch  # as Opacus's DPDataLoader: one expected batch per step
        self.expected_batch = n * self.sample_rate
        self.n = n
        if self.cfg.delta >= 1.0 / n:
            raise ConfigError(f"train.privacy.delta: {self.cfg.delta:g} is not below 1 / {n:,} (one over the training "
                              "samples): a mechanism that publishes one whole sample would meet it; use e.g. "
                              f"{10 ** math.floor(math.log10(0.1 / n)):g}")
        self.planned_steps = trainer.plan.total_steps
        last = trainer.run_dir / RunDir.LAST
        if last.is_file():  # resuming (a new run's directory has none): refuse an overdrawn budget before writing
            self.check_budget(read_metadata(last)["state"]["progress"].get("privacy"))
        epochs = trainer.t.epochs
        self.noise_multiplier = noise_for(self.cfg, self.sample_rate, self.planned_steps,
                                          f"{epochs} epoch{'s' if epochs != 1 else ''}")
        check_model(trainer.model, [b.type for b in trainer.cfg.blocks])
        self.swapped = _replace(trainer.model, _dp_layer)
        # Opacus's hooks and functorch path warn on every run about what they handle: inputs that need no
        # gradient, and an autocast to float32 that does nothing.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
        errors = opacus.grad_sample.GradSampleModule.validate(trainer.model, strict=False)
        if errors:
            raise ConfigError("train.privacy: per-sample gradients cannot be computed for this model: "
                              + "; ".join(str(e) for e in errors))
        self.hooks = opacus.grad_sample.GradSampleHooks(trainer.model, batch_first=True, loss_reduction="mean",
                                                        force_functorch=self.cfg.mode == "functorch")
        self.accountant = opacus.accountants.create_accountant(mechanism=self.cfg.accountant)
        self.gen = _secret_generator()  # Poisson batches
        self.optimizer = None

    def wrap(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """kiln's optimiser inside Opacus's DPOptimizer: clip each sample's gradient, add noise, then step."""
        opacus = _opacus()
        self.optimizer = opacus.optimizers.DPOptimizer(
            optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=self.expected_batch, loss_reduction="mean", generator=_secret_generator(self.tr.device))
        self.optimizer.attach_step_hook(self._count)
        return self.optimizer

    def _count(self, optimizer) -> None:
        self.accountant.step(noise_multiplier=optimizer.noise_multiplier, sample_rate=self.sample_rate)
        self.tr.state.privacy = self.state()

    def batches(self) -> PoissonBatches:
        return PoissonBatches(self.n, self.sample_rate, self.steps_per_epoch, self.gen, self.tr.device)

    def empty_step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """An empty Poisson batch: the step adds noise alone and is counted; the logs see no sample."""
        tr = self.tr
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        self.optimizer.step()
        tr.scheduler.step()
        zero = torch.zeros((), device=tr.device)
        return zero, zero.long(), 0

    # ---- what was spent, and resume --------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """For the checkpoint (TrainState.privacy): the noise this run started with and the accountant's history."""
        return {"noise_multiplier": self.noise_multiplier, "planned_steps": self.planned_steps,
                "history": [list(h) for h in self.accountant.history]}

    def restore(self, saved: dict[str, Any] | None) -> None:
        """Continue the saved run's budget: its accountant history and noise. More epochs than it was started with
        would spend more than its epsilon: refused, naming what they would spend."""
        self.check_budget(saved)
        self.accountant.history = [tuple(h) for h in saved["history"]]
        sigma = saved["noise_multiplier"]
        self.noise_multiplier = sigma
        if self.optimizer is not None:
            self.optimizer.noise_multiplier = sigma
        self.tr.state.privacy = self.state()

    def check_budget(self, saved: dict[str, Any] | None) -> None:
        if saved is None:
            raise RunDirError("--resume: the checkpoint has no privacy state (it was trained without train.privacy)")
        sigma = saved["noise_multiplier"]
        if self.planned_steps > saved["planned_steps"]:
            total = epsilon_spent(self.cfg.accountant, sigma, self.sample_rate, self.planned_steps, self.cfg.delta)
            if total > self.cfg.epsilon * 1.001:
                epochs = saved["planned_steps"] // self.steps_per_epoch
                raise ConfigError(f"--resume: {self.tr.t.epochs} epochs at this run's noise multiplier {sigma:.4g} "
                                  f"would spend epsilon {total:.3g}, more than train.privacy.epsilon "
                                  f"{self.cfg.epsilon:g}; it was planned for {epochs} epochs. Keep train.epochs at "
                                  f"{epochs}, or raise epsilon")

    def summary(self) -> dict[str, Any]:
        """What results.json and manifest.json record: the epsilon actually spent by the steps taken."""
        c = self.cfg
        steps = sum(h[2] for h in self.accountant.history)
        spent = epsilon_spent(c.accountant, self.noise_multiplier, self.sample_rate, steps, c.delta) if steps else 0.0
        if len({(h[0], h[1]) for h in self.accountant.history}) > 1:
            spent = float(self.accountant.get_epsilon(delta=c.delta))
        return {"epsilon": round(spent, 4), "delta": c.delta, "max_grad_norm": c.max_grad_norm,
                "noise_multiplier": round(self.noise_multiplier, 6), "accountant": c.accountant,
                "target_epsilon": c.epsilon, "steps": steps, "sample_rate": self.sample_rate,
                "expected_batch_size": round(self.expected_batch, 2), "mode": c.mode,
                "layers_swapped": self.swapped}

    def release(self) -> None:
        """After training: remove the hooks and Opacus's attributes, and put PyTorch's recurrent layers back."""
        self.hooks.cleanup()
        for p in self.tr.model.parameters():
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        _replace(self.tr.model, _torch_layer)


def check_settings(trainer) -> None:
    """Training settings that would leak or that per-sample clipping replaces, refused before anything is written."""
    t, kind = trainer.t, trainer.kind
    if kind.trains_by_steps:
        raise ConfigError(f"train.privacy: {kind.description} data trains on random windows of one text, where a "
                          "training sample is not one record; differential privacy applies to data trained by epochs "
                          "(images, tables, text classes)")
    if t.hard_examples:
        raise ConfigError("train.privacy: train.hard_examples chooses samples by their loss, which privacy cannot "
                          "allow; remove one of them")
    if t.class_weights:
        raise ConfigError("train.privacy: train.class_weights divides a batch's loss by the batch's summed weights, "
                          "which ties each sample's gradient to the others in its batch; remove class_weights")
    if t.grad_clip:
        raise ConfigError("train.privacy: train.grad_clip clips the batch's gradient; under privacy each sample's "
                          "gradient is clipped to train.privacy.max_grad_norm: remove train.grad_clip")
    if t.l1 or t.l2:
        raise ConfigError("train.privacy: train.l1 and train.l2 add a penalty whose gradient has no per-sample "
                          "part; use train.optimizer.weight_decay instead")
    if trainer.precision.name == "fp16":
        raise ConfigError("train.privacy: fp16 loss scaling is not supported with per-sample gradients; use "
                          "train.precision: fp32 or bf16")


def fuse_choice(requested: str) -> tuple[bool, str]:
    """kiln.nn.fuse's kernels compute gradients of whole layers, not per sample: off in a private run."""
    if requested == "on":
        raise ConfigError("train.fuse: on cannot be used with train.privacy (the fused kernels compute gradients of "
                          "whole layers, not per sample); use fuse: auto or off")
    return False, "off: train.privacy needs PyTorch's layers for per-sample gradients"
