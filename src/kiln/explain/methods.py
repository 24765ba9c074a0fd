"""Attributions with Captum: one function for every method and every model kiln builds.

A model whose first block reads codes (token ids, a table's category codes: ``reads_codes``) has no gradient
at its input, and codes cannot be interpolated; gradient methods then attribute at that block's output (Captum's
``Layer*`` methods: the embedding of each token, the encoding of each column) and sum each position's values back
onto the input position it came from. Other models are attributed at their input. Occlusion always works at the
input: it replaces a position (a patch of pixels, a token, a table column) by the baseline's and measures the
change of the output.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from kiln.errors import KilnError

METHODS = ("integrated_gradients", "saliency", "occlusion", "shap")
IG_STEPS = 64  # first try; doubled while the completeness gap is above IG_TOLERANCE, up to IG_MAX_STEPS
IG_MAX_STEPS = 1024
IG_TOLERANCE = 0.01  # |sum of attributions - (output - baseline output)| / |output - baseline output|
IG_ABSOLUTE = 1e-4  # ... or this absolute gap, for an output that hardly changes from the baseline
SHAP_SAMPLES = 64
SHAP_SEED = 0
INTERNAL_BATCH = 512  # samples of one forward/backward inside Captum
PER_EVAL = 16  # occlusion: perturbed copies of the batch in one forward pass


def captum():
    try:
        import captum.attr as attr  # noqa: PLR0402 (this form finds a blocked or missing module in sys.modules)
    except ImportError:
        raise KilnError("explanations need Captum: pip install 'kiln[explain]'") from None
    return attr


@dataclass
class Attribution:
    values: torch.Tensor  # (B, G) per group when groups were given, else (B, *input positions)
    output: torch.Tensor  # (B,) the explained output (a logit, or a regression value) at the input
    start: torch.Tensor  # (B,) the same output at the baseline (the start of integrated gradients' path)
    steps: torch.Tensor | None = None  # integrated gradients: the steps each sample took (B,)


def attribute(model: torch.nn.Module, x: torch.Tensor, baseline: torch.Tensor, target: torch.Tensor | None,
              method: str, groups: list[list[int]] | None = None) -> Attribution:
    """Attributions of ``model``'s output ``target`` (one class index per sample, or None for a single output) for
    model input ``x`` (B, ...) against ``baseline`` (same shape). ``groups``: lists of flattened input positions
    that count as one feature; the result then has one value per group."""
    if method not in METHODS:
        raise KilnError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    attr = captum()
    codes = not x.is_floating_point()
    layer = model.blocks[0] if getattr(model.blocks[0], "reads_codes", False) else None

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        out = model(inputs.round().long() if codes and inputs.is_floating_point() else inputs)
        return out if out.dim() == 2 else out.reshape(len(out), -1)

    with _cudnn_off(x.device), torch.enable_grad():
        with torch.no_grad():
            output = _pick(forward(x), target)
            start = _pick(_forward_from(model, forward, layer, x, baseline), target)
        steps = None
        if method == "occlusion":
            values = _occlusion(attr, forward, x, baseline, target, groups)
            return Attribution(values, output, start)
        if method == "integrated_gradients":
            values, steps = _integrated(attr, forward, layer, x, baseline, target, output - start)
        elif method == "saliency":
            if layer is None:
                values = attr.Saliency(forward).attribute(x.clone().requires_grad_(), target=target, abs=True)
            else:
                grads = attr.LayerGradientXActivation(forward, layer, multiply_by_inputs=False).attribute(
                    x, target=target)
                values = _to_inputs(layer, grads.abs(), x)
        else:  # shap: expected gradients from the baseline (GradientShap), without added noise
            with _seeded(SHAP_SEED):  # its random points on the path: the same explanation every time
                if layer is None:
                    values = attr.GradientShap(forward).attribute(x, baselines=baseline[:1], target=target,
                                                                   n_samples=SHAP_SAMPLES, stdevs=0.0)
                else:
                    values = _to_inputs(layer, attr.LayerGradientShap(forward, layer).attribute(
                        x, baselines=baseline[:1], target=target, n_samples=SHAP_SAMPLES, stdevs=0.0), x)
    values = values.detach()
    if groups is not None:
        flat = values.reshape(len(values), -1)
        values = torch.stack([flat[:, g].sum(1) for g in groups], dim=1)
    return Attribution(values, output, start, steps)


def _pick(out: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    return out[:, 0] if target is None else out.gather(1, target[:, None])[:, 0]


def _forward_from(model, forward, layer, x: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """The model's output at the start of the attribution path: the baseline itself, or with a code-reading first
    block, ``x`` read with that block's output replaced by the baseline's (so a text keeps its own padding mask)."""
    if layer is None:
        return forward(baseline)
    start = layer(baseline)
    handle = layer.register_forward_hook(lambda module, inputs, output: start)
    try:
        return forward(x)
    finally:
        handle.remove()


def _integrated(attr, forward, layer, x, baseline, target, change: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated gradients with as many steps as completeness needs: the gap within IG_TOLERANCE of the output's
    change (or IG_ABSOLUTE), else IG_MAX_STEPS. Returns the attributions and each sample's steps."""
    def run(rows: torch.Tensor, steps: int) -> torch.Tensor:
        xs, bs, ts = x[rows], baseline[rows], None if target is None else target[rows]
        if layer is None:
            return attr.IntegratedGradients(forward).attribute(
                xs, baselines=bs, target=ts, n_steps=steps, internal_batch_size=INTERNAL_BATCH).detach()
        return _to_inputs(layer, attr.LayerIntegratedGradients(forward, layer).attribute(
            xs, baselines=bs, target=ts, n_steps=steps, internal_batch_size=INTERNAL_BATCH), xs).detach()

    steps, rows = IG_STEPS, torch.arange(len(x), device=x.device)
    values, used = run(rows, steps), torch.full((len(x),), IG_STEPS)
    while True:  # only the samples whose gap is still too large take more steps
        total = values.reshape(len(values), -1).sum(1)
        allowed = (IG_TOLERANCE * change.abs()).clamp_min(IG_ABSOLUTE)
        rows = ((total - change).abs() > allowed).nonzero()[:, 0]
        if not len(rows) or steps >= IG_MAX_STEPS:
            return values, used
        steps *= 2
        values[rows] = run(rows, steps)
        used[rows.cpu()] = steps


def _to_inputs(layer, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A code-reading block's output attributions back onto its input positions (B, positions)."""
    n = x.shape[1]
    if hasattr(layer, "output_sources"):
        sources = layer.output_sources().to(values.device)
        out = values.new_zeros(len(values), n)
        return out.index_add_(1, sources, values.reshape(len(values), -1))
    return values.sum(-1)[:, :n]  # (B, steps, width): step i is input position i (a summary token after them)


def _occlusion(attr, forward, x, baseline, target, groups) -> torch.Tensor:
    xf, bf = x.float(), baseline.float()
    if x.dim() == 4:  # images: square patches of about a seventh of the side, half overlapping
        c, h, w = x.shape[1:]
        side = max(2, min(h, w) // 7)
        stride = max(1, side // 2)
        return attr.Occlusion(forward).attribute(xf, sliding_window_shapes=(c, side, side),
                                                 strides=(c, stride, stride), baselines=bf, target=target,
                                                 perturbations_per_eval=PER_EVAL).detach()
    flat_shape = xf.shape[1:]
    if groups is None:
        mask = torch.arange(xf[0].numel(), device=x.device).reshape(1, *flat_shape)
    else:
        mask = torch.zeros(xf[0].numel(), dtype=torch.int64, device=x.device)
        for k, g in enumerate(groups):
            mask[g] = k
        mask = mask.reshape(1, *flat_shape)
    values = attr.FeatureAblation(forward).attribute(xf, baselines=bf, target=target, feature_mask=mask,
                                                     perturbations_per_eval=PER_EVAL).detach()
    if groups is None:
        return values
    flat = values.reshape(len(values), -1)
    return torch.stack([flat[:, g[0]] for g in groups], dim=1)  # each position of a group holds the group's value


@contextlib.contextmanager
def _seeded(seed: int):
    """NumPy's global generator seeded, and restored afterwards (Captum's GradientShap draws its points on the
    path with ``np.random.uniform``)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _cudnn_off(device: torch.device):
    """cuDNN's recurrent layers compute gradients in training mode only (captum#564): switch cuDNN off rather
    than the model to training mode, which would turn dropout on."""
    return torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else contextlib.nullcontext()
