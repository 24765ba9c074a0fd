"""``ImageKind``: what every image kind of data shares (uint8 storage, scaling, augmentation, image files and
image requests for prediction).

A kind of image data (MNIST's IDX files, and later folders of photos) subclasses ``ImageKind`` and only says
where its images come from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, PositiveInt

from kiln.data.image_inputs import ImageInputs
from kiln.data.kind import DataKind, DataSpec
from kiln.data.pixels import PIXEL_SCALE, augment, fit_image, read_image_file, to_model_input
from kiln.schema import StrictModel


class AugmentConfig(StrictModel):
    """Random per-sample affine transforms of training images, applied as batched tensor ops."""

    shift: float = Field(default=0.0, ge=0.0, le=1.0)  # largest translation, as a fraction of the image size
    rotate: float = Field(default=0.0, ge=0.0, le=180.0)  # largest rotation, degrees
    scale: float = Field(default=0.0, ge=0.0, lt=1.0)  # largest zoom in or out, as a fraction


class ImageSpec(DataSpec):
    limit_train: PositiveInt | None = None  # use only the first N training images (quick experiments)
    limit_test: PositiveInt | None = None
    augment: AugmentConfig = AugmentConfig()


class ImageKind(DataKind):
    """Images stored as uint8 (N, C, H, W); the model reads them scaled to [0, 1]."""

    description: ClassVar[str] = "image"
    usage: ClassVar[str] = "classify image files with `kiln predict RUN IMAGE...` or Run.predict"
    input_name: ClassVar[str] = "pixels"

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        return to_model_input(x)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a = self.cfg.augment
        return augment(x, a.shift, a.rotate, a.scale, gen) if (a.shift or a.rotate or a.scale) else x

    def shown(self, split: str, x: torch.Tensor, idx: list[int]) -> list[dict[str, Any]]:
        """The stored pixels, (H, W) grey or (H, W, C) colour."""
        return [{"image": (img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy()} for img in x[idx]]

    def as_stored(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W), (N, H, W) for one channel, or one image; uint8 0..255 or float 0..1."""
        shape = self.input_shape
        grey = shape[0] == 1
        if grey and x.dim() == len(shape) - 1:
            x = x[None, None]  # one image (H, W)
        elif grey and x.dim() == len(shape):
            x = x.unsqueeze(1)  # (N, H, W)
        elif x.dim() == len(shape):
            x = x.unsqueeze(0)  # one image (C, H, W)
        if x.is_floating_point():
            x = (x.clamp(0, 1) * PIXEL_SCALE).round()
        return x.to(torch.uint8)

    def random_inputs(self, n: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, 256, (n, *self.input_shape), dtype=torch.uint8, generator=gen)

    def fit(self, img) -> np.ndarray:
        """An opened PIL image as uint8 (C, H, W) in the input shape: how `kiln predict` and a server read image
        files (MNIST-style: grey, resized, a light background inverted; photo kinds override it)."""
        return fit_image(img, self.input_shape)

    image_formats: ClassVar[list[str]] = ["PNG", "JPEG"]  # what a server decodes (Pillow's format names)

    def inputs(self) -> ImageInputs:
        return ImageInputs(self.input_shape, self.fit, self.image_formats)

    def predict_files(self, run, paths: list[str | Path]) -> list[dict[str, Any]]:
        """Each image or .npy file's class and probabilities."""
        images = torch.stack([read_image_file(Path(p), self.input_shape, self.fit) for p in paths])
        names = self.class_names
        return [
            {"file": str(p), "class": names[int(row.argmax())], "probability": float(row.max()),
             "probabilities": {n: round(float(v), 6) for n, v in zip(names, row, strict=True)}}
            for p, row in zip(paths, run.predict(images), strict=True)
        ]

    explains: ClassVar[str | None] = "image"

    def explain_inputs(self, paths: list[str | Path]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Image or .npy files, read as `kiln predict` reads them."""
        images = torch.stack([read_image_file(Path(p), self.input_shape, self.fit) for p in paths])
        return images, [{"name": Path(p).stem, "file": str(p)} for p in paths]

    def explain_baseline(self, x: torch.Tensor) -> torch.Tensor:
        """A black image, as the model reads it."""
        return self.to_input(torch.zeros(x.shape, dtype=torch.uint8, device=x.device))

    def render(self, records: list[dict[str, Any]]) -> str:
        lines = []
        for r in records:
            probs = "  ".join(f"{k}:{v:.3f}" for k, v in r["probabilities"].items())
            lines.append(f"{r['file']}: {r['class']} ({r['probability'] * 100:.1f}%)  {probs}\n")
        return "".join(lines)
