"""Device and numeric precision: what to run on and in which float format, decided once per run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from kiln.errors import ConfigError
from kiln.hardware import cpu_flags


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {requested!r} was asked for but PyTorch sees no CUDA device; use auto or cpu")
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: 'mps' was asked for but is not available here; use auto or cpu")
    return torch.device(requested)


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16
    reason: str  # why this was chosen, for the log and the manifest
    device_type: str

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(self.device_type, dtype=dtype)

    def for_inference(self) -> Precision:
        """The precision evaluation and prediction use. On a CPU that is float32 whatever training used: export,
        serving and `kiln predict` all run the model in float32 there, and a run's test metrics must be what
        `kiln evaluate` gives later. On accelerators evaluation keeps the training precision (its speed)."""
        if self.device_type == "cpu" and self.name != "fp32":
            return Precision("fp32", f"float32 for inference on the CPU (training: {self.name})", "cpu")
        return self

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        # fp16 has too few exponent bits for small gradients; bf16 and fp32 need no scaling.
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


def pick_precision(requested: str, device: torch.device) -> Precision:
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 with loss scaling needs a CUDA device; use bf16 or fp32 on CPU")
    if requested != "auto":
        return Precision(requested, "set in the config", device.type)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "auto: CUDA device with bf16 support", "cuda")
        return Precision("fp16", "auto: CUDA device without bf16; fp16 with loss scaling", "cuda")
    if "amx_bf16" in cpu_flags():
        return Precision("bf16", "auto: CPU with bf16 matrix tiles (amx_bf16)", device.type)
    # Without AMX tiles bf16 is a trade, so fp32 stays the default: without AVX-512 BF16, bf16 matrix multiplies
    # ran at 0.3 to 1 GFLOP/s against about 110 in fp32; with it (a 2-core EPYC with avx512_bf16), the seed model
    # trained 2x slower in bf16 (its fp32 C kernels do not run under autocast) while nanoGPT's CPU configuration
    # trained about 15% faster (17.3-18.1 against 20.4-23.4 s per 500 steps). fp32 training also computes as
    # evaluation, export and serving do on a CPU. `train.precision: bf16` asks for bf16.
    return Precision("fp32", "auto: fp32 on a CPU without bf16 tiles (AMX); bf16 is a trade there",
                     device.type)


def inference_precision(requested: str, device: torch.device) -> Precision:
    """What a finished run predicts in on ``device`` (see ``Precision.for_inference``)."""
    if device.type == "cpu":
        return Precision("fp32", "float32 for inference on the CPU", "cpu")
    return pick_precision(requested, device)


def pick_fuse(requested: str, device: torch.device) -> tuple[bool, str]:
    """Whether to apply kiln.nn.fuse, and why. Its rewrites were measured faster on CPU only; on CUDA,
    cuDNN's convolutions are left alone."""
    if requested != "auto":
        return requested == "on", "set in the config"
    if device.type == "cpu":
        return True, "auto: CPU, where the fused kernels measured faster"
    return False, f"auto: {device.type}, where the fused kernels were not measured"
