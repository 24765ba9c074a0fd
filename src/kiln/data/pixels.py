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


def read_image_file(path: Path, shape: tuple[int, int, int], fit=None) -> torch.Tensor:
    """An image file (PNG/JPEG/...) or a .npy array, as uint8 (C, H, W) in the model's input shape.

    ``fit`` turns the opened PIL image into that array (default: :func:`fit_image`, for MNIST-style digits)."""
    if path.suffix.lower() == ".npy":
        return _read_npy(path, shape)
    from PIL import Image, UnidentifiedImageError

    fit = fit or (lambda img: fit_image(img, shape))
    try:
        with Image.open(path) as img:
            arr = fit(img)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
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


# ---- photos: any size and mode, resized by a policy; colour augmentation -------------------------------------

RESIZE_POLICIES = ("crop", "stretch", "pad")


def fit_photo(img, channels: int, size: tuple[int, int], policy: str) -> np.ndarray:
    """A PIL image of any size and mode (opened, not necessarily loaded) as uint8 (C, H, W).

    ``policy``: ``crop`` scales the shorter side to fit and cuts the centre; ``stretch`` resizes to (H, W)
    ignoring the aspect ratio; ``pad`` scales the longer side to fit and pads with black. EXIF orientation is
    applied; transparent pixels become white; 16-bit grey is scaled to 8 bits. Nothing is inverted (unlike
    :func:`fit_image`, which fits MNIST-style digits). JPEGs are decoded at a reduced scale when that is still at
    least the target size (the decoder's draft mode), which makes large photos several times faster to read.
    """
    from PIL import Image, ImageOps

    if policy not in RESIZE_POLICIES:
        raise ValueError(f"resize policy {policy!r} is not one of {', '.join(RESIZE_POLICIES)}")
    h, w = size
    if img.format == "JPEG":
        side = max(h, w)
        img.draft("L" if channels == 1 else "RGB", (side, side))  # at least side x side (EXIF may swap the axes)
    img = ImageOps.exif_transpose(img) or img
    img = _plain_mode(img, channels)
    iw, ih = img.size
    resample = Image.Resampling.BILINEAR
    if policy == "stretch" or (iw, ih) == (w, h):
        if (iw, ih) != (w, h):
            img = img.resize((w, h), resample)
    elif policy == "crop":
        scale = max(w / iw, h / ih)
        sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
        left, top = (sw - w) // 2, (sh - h) // 2
        img = img.resize((sw, sh), resample).crop((left, top, left + w, top + h))
    else:  # pad
        scale = min(w / iw, h / ih)
        sw, sh = max(1, min(w, round(iw * scale))), max(1, min(h, round(ih * scale)))
        canvas = Image.new(img.mode, (w, h))
        canvas.paste(img.resize((sw, sh), resample), ((w - sw) // 2, (h - sh) // 2))
        img = canvas
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


def _plain_mode(img, channels: int):
    """``img`` as mode L (1 channel) or RGB (3)."""
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):  # 16/32-bit grey: 0..65535 (I;16) or as stored, to 0..255
        arr = np.asarray(img, dtype=np.float64)
        arr = arr / 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else arr
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    elif mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info) or \
            (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("L" if channels == 1 else "RGB")


def photo_augment(x: torch.Tensor, a, gen: torch.Generator) -> torch.Tensor:
    """Random training-time changes of a batch of photos x: float (B, C, H, W) in [0, 1], all as batched tensor
    operations. ``a`` holds the settings (see ``PhotoAugment`` in :mod:`kiln.data.folders`):

    - geometry, in one ``grid_sample``: a random resized crop (area ``crop_scale``..1 of the image, aspect ratio
      ``crop_ratio``), a horizontal flip (``flip``), and the affine ``shift``/``rotate``/``scale`` that every image
      kind has; pixels from outside the image are black;
    - colour jitter: brightness, contrast and saturation factors drawn from [1 - v, 1 + v];
    - cutout is not here: it is applied to model input by the caller (its square is then the mean colour).
    """
    b, c, h, w = x.shape
    dev = x.device

    def rand(limit_lo: float, limit_hi: float) -> torch.Tensor:
        return torch.rand(b, generator=gen, device=dev) * (limit_hi - limit_lo) + limit_lo

    geometric = a.crop_scale < 1.0 or a.shift or a.rotate or a.scale
    if geometric:
        one, zero = torch.ones(b, device=dev), torch.zeros(b, device=dev)
        # Crop: the output spans a window of (sw, sh) of the input's [-1, 1] extent, centred at (cx, cy).
        if a.crop_scale < 1.0:
            area = rand(a.crop_scale, 1.0)
            log_lo, log_hi = math.log(a.crop_ratio[0]), math.log(a.crop_ratio[1])
            ratio = torch.exp(rand(log_lo, log_hi))
            sw, sh = torch.sqrt(area * ratio).clamp(max=1.0), torch.sqrt(area / ratio).clamp(max=1.0)
            cx, cy = (rand(-1.0, 1.0)) * (1 - sw), (rand(-1.0, 1.0)) * (1 - sh)
        else:
            sw, sh, cx, cy = one, one, zero, zero
        if a.flip:
            sw = sw * torch.where(torch.rand(b, generator=gen, device=dev) < 0.5, -1.0, 1.0)
        crop = torch.stack([torch.stack([sw, zero, cx], 1), torch.stack([zero, sh, cy], 1),
                            torch.stack([zero, zero, one], 1)], 1)  # (B, 3, 3)
        angle = rand(-1.0, 1.0) * math.radians(a.rotate)
        zoom = 1.0 + rand(-1.0, 1.0) * a.scale
        tx, ty = rand(-1.0, 1.0) * 2 * a.shift, rand(-1.0, 1.0) * 2 * a.shift
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        affine = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1),
                              torch.stack([zero, zero, one], 1)], 1)
        theta = (affine @ crop)[:, :2]  # output -> crop window -> affine: one sampling of the input
        grid = F.affine_grid(theta, [b, c, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif a.flip:
        flip = torch.rand(b, generator=gen, device=dev) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if a.brightness:
        x = x * rand(1 - a.brightness, 1 + a.brightness)[:, None, None, None]
    if a.contrast:
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * rand(1 - a.contrast, 1 + a.contrast)[:, None, None, None] + mean
    if a.saturation and c == 3:
        x = (x - _grey(x)) * rand(1 - a.saturation, 1 + a.saturation)[:, None, None, None] + _grey(x)
    return x.clamp(0.0, 1.0) if (a.brightness or a.contrast or a.saturation) else x


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) of RGB (ITU-R 601 weights), or the single channel itself."""
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def cutout(x: torch.Tensor, size: float, gen: torch.Generator) -> torch.Tensor:
    """Zero one square of side ``size`` x the image's height and width per sample, at a random centre (it may
    reach past the border, as in DeVries and Taylor 2017). x: (B, C, H, W)."""
    b, _, h, w = x.shape
    dev = x.device
    ch, cw = max(1, round(size * h)), max(1, round(size * w))
    cy = torch.randint(0, h, (b,), generator=gen, device=dev)
    cx = torch.randint(0, w, (b,), generator=gen, device=dev)
    ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
    inside_y = (ys[None] >= (cy - ch // 2)[:, None]) & (ys[None] < (cy - ch // 2 + ch)[:, None])  # (B, H)
    inside_x = (xs[None] >= (cx - cw // 2)[:, None]) & (xs[None] < (cx - cw // 2 + cw)[:, None])  # (B, W)
    mask = inside_y[:, None, :, None] & inside_x[:, None, None, :]
    return x.masked_fill(mask, 0.0)
