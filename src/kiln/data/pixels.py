"""Image pixels: uint8 storage scaled to model input, batched augmentation, and image files read into the model's
input shape. Shared by every image kind of data and by their request readers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.errors import DataError

PIXEL_SCALE = 255.0  # uint8 pixels to [0, 1]


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) to float32 in [0, 1]; the one place pixel scaling happens."""
    return images.to(torch.float32).div_(PIXEL_SCALE)


def augment(x: torch.Tensor, shift: float, rotate: float, scale: float, gen: torch.Generator) -> torch.Tensor:
    """A random affine transform per sample, all in one batched ``grid_sample``.

    x: float (B, C, H, W). shift: largest translation as a fraction of the size; rotate: largest angle in
    degrees; scale: largest zoom as a fraction. Pixels moved in from outside are 0 (background).
    """
    b = x.shape[0]

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(b, generator=gen, device=x.device) * 2 - 1) * limit

    angle = uniform(math.radians(rotate))
    zoom = 1.0 + uniform(scale)
    tx, ty = uniform(2 * shift), uniform(2 * shift)  # affine_grid coordinates span [-1, 1]: size 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def fit_image(img, shape: tuple[int, int, int]) -> np.ndarray:
    """A decoded PIL image as uint8 (C, H, W) in the model's input shape.

    Colour images become grey for 1-channel models and every image is resized to (H, W). MNIST-style
    models expect a light digit on a dark background: an image whose border is mostly light is inverted.
    """
    from PIL import Image

    c, h, w = shape
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=None)
    return 255 - arr if border.mean() > 127 else np.ascontiguousarray(arr)


def read_image_file(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file (PNG/JPEG/...) or a .npy array, as uint8 (C, H, W) in the model's input shape."""
    if path.suffix.lower() == ".npy":
        return _read_npy(path, shape)
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            arr = fit_image(img, shape)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable image (PNG, JPEG, ...) or .npy array: {e}") from None
    return torch.from_numpy(arr.copy())


def _read_npy(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    try:
        arr = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path} is not a valid .npy array: {e}") from None
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path}: array of shape {arr.shape} does not fit the model input {shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DataError(f"{path}: float arrays must hold pixels in [0, 1]")
        arr = np.rint(arr * PIXEL_SCALE)
    elif not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 255:
        raise DataError(f"{path}: integer arrays must hold pixels in 0..255 (dtype {arr.dtype})")
    return torch.from_numpy(arr.astype(np.uint8).reshape(shape))
