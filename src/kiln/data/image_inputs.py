"""Served image requests: pixel arrays in the model's shape, base64 PNG/JPEG, or uploaded PNG/JPEG files, checked
and converted to one uint8 batch (see :mod:`kiln.data.requests` for the contract)."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, create_model

from kiln.data.pixels import fit_image
from kiln.errors import InputError

MAX_IMAGE_SIDE = 4096  # pixels; larger uploads are refused before decoding (decompression bombs)
# Pixels (width x height) of all the images of one request together, counted before each is decoded: bounds a
# request's decoding time (a 4096x4096 RGB PNG of 49 kB took 0.32 s on a 2-core EPYC).
MAX_REQUEST_PIXELS = 2 * MAX_IMAGE_SIDE**2
IMAGE_FORMATS = ["PNG", "JPEG"]


class ImageInputs:
    """Images: pixel arrays in the model's shape, or base64 PNG/JPEG, or uploaded PNG/JPEG files.

    Pixel arrays are (H, W) for one-channel models or (C, H, W), values 0..255 (``scale: uint8``, the
    default) or 0..1 (``scale: unit``). Encoded images are converted like ``kiln predict`` does: to the
    model's channels, resized to (H, W), and inverted when the background is light.
    """

    kind = "image"
    accepts_files = True

    def __init__(self, shape: tuple[int, int, int], fit=None, formats: list[str] | None = None) -> None:
        """``fit`` turns a decoded PIL image into uint8 (C, H, W) (default: :func:`fit_image`, as for MNIST);
        ``formats``: the Pillow formats accepted (default PNG and JPEG)."""
        self.shape = tuple(shape)  # (C, H, W)
        self.fit = fit or (lambda img: fit_image(img, self.shape))
        self.formats = list(formats or IMAGE_FORMATS)
        names = "/".join(self.formats)
        c, h, w = self.shape
        pixel = Annotated[float, Strict(), Field(ge=0, le=255)]  # a number: not "12", not true
        row = Annotated[list[pixel], Field(min_length=w, max_length=w)]
        plane = Annotated[list[row], Field(min_length=h, max_length=h)]
        array = plane if c == 1 else Annotated[list[plane], Field(min_length=c, max_length=c)]
        layout = f"({h}, {w})" if c == 1 else f"({c}, {h}, {w})"
        strict = ConfigDict(extra="forbid")
        self._pixels = create_model(
            "PixelInstance", __config__=strict,
            pixels=(array, Field(description=f"pixel values, nested {layout}")),
            scale=(Literal["uint8", "unit"], Field("uint8", description="uint8: 0..255; unit: 0..1")),
        )
        self._encoded = create_model(
            "EncodedImageInstance", __config__=strict,
            image_base64=(str, Field(min_length=4, max_length=12 * 2**20, pattern=r"^[A-Za-z0-9+/]+={0,2}$",
                                     description=f"a {names} file, base64-encoded (standard alphabet)")),
        )

    def instance_model(self) -> Any:
        def which(v: Any) -> str | None:
            if isinstance(v, dict):
                return "base64-instance" if "image_base64" in v else "pixels-instance"
            return None

        return Annotated[
            Annotated[self._pixels, Tag("pixels-instance")] | Annotated[self._encoded, Tag("base64-instance")],
            Discriminator(which, custom_error_type="instance_type",
                          custom_error_message="each instance is an object with `pixels` or `image_base64`"),
        ]

    def from_instances(self, instances: list[BaseModel]) -> np.ndarray:
        out = np.empty((len(instances), *self.shape), dtype=np.uint8)
        budget = _PixelBudget()
        for i, inst in enumerate(instances):
            if hasattr(inst, "pixels"):
                out[i] = self._from_pixels(inst.pixels, inst.scale, f"instances.{i}.pixels")
            else:
                out[i] = self._decode(self._b64(inst.image_base64, f"instances.{i}.image_base64"),
                                      f"instances.{i}.image_base64", budget)
        return out

    def from_json(self, instances: list[Any]) -> np.ndarray | None:
        """The batch for parsed JSON instances when every one is a plain, valid pixel array; ``None``
        otherwise, and the schema path then checks them and names what is wrong. Numpy checks 784
        numbers much faster than validating them one by one."""
        grey = self.shape[0] == 1
        out = np.empty((len(instances), *self.shape), dtype=np.uint8)
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or "pixels" not in inst or not inst.keys() <= {"pixels", "scale"}:
                return None
            scale = inst.get("scale", "uint8")
            try:
                arr = np.array(inst["pixels"])
            except (ValueError, TypeError):  # ragged nesting
                return None
            if arr.dtype.kind not in "iuf" or arr.shape != (self.shape[1:] if grey else self.shape):
                return None  # booleans, strings, objects, wrong shape
            top = 1.0 if scale == "unit" else 255.0 if scale == "uint8" else None
            if top is None or arr.size == 0 or not (arr.min() >= 0 and arr.max() <= top):  # NaN fails too
                return None
            out[i] = np.rint(arr * (255.0 / top) if top != 255.0 else arr).reshape(self.shape)
        return out

    def from_files(self, files: list[tuple[str, bytes]]) -> np.ndarray:
        out = np.empty((len(files), *self.shape), dtype=np.uint8)
        budget = _PixelBudget()
        for i, (name, data) in enumerate(files):
            out[i] = self._decode(data, f"files.{i} ({name})", budget)
        return out

    def example(self) -> np.ndarray:
        return np.zeros((1, *self.shape), dtype=np.uint8)

    def describe(self) -> dict[str, Any]:
        c, h, w = self.shape
        return {"kind": "image", "shape": [c, h, w], "channels": c, "height": h, "width": w,
                "json": ["pixels (0..255, or 0..1 with scale=unit)", f"image_base64 ({'/'.join(self.formats)})"],
                "multipart": f"one or more {'/'.join(self.formats)} files in the form field `files`"}

    def _from_pixels(self, pixels: list, scale: str, where: str) -> np.ndarray:
        arr = np.asarray(pixels, dtype=np.float64).reshape(self.shape)  # lengths checked by the schema
        if not np.isfinite(arr).all():
            raise InputError(where, "pixel values must be finite numbers")
        if scale == "unit":
            if arr.max() > 1.0:
                raise InputError(where, f"with scale=unit pixels must be in [0, 1], got a maximum of {arr.max():g}")
            arr = arr * 255.0
        return np.rint(arr).astype(np.uint8)

    @staticmethod
    def _b64(text: str, where: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(where, "not valid base64 (standard alphabet, padded)") from None

    def _decode(self, data: bytes, where: str, budget: _PixelBudget) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data), formats=self.formats) as img:
                if max(img.size) > MAX_IMAGE_SIDE:
                    raise InputError(where, f"image is {img.size[0]}x{img.size[1]}; the largest side allowed is "
                                          f"{MAX_IMAGE_SIDE} pixels")
                budget.take(img.size, where)
                return self.fit(img)  # the same conversion as `kiln predict`
        except InputError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            reason = "unknown format" if isinstance(e, UnidentifiedImageError) else str(e)
            raise InputError(where, f"not a readable {' or '.join(self.formats)} image ({reason})") from None


class _PixelBudget:
    """The pixels one request's images may still decode to (``MAX_REQUEST_PIXELS`` in all)."""

    def __init__(self) -> None:
        self.left = MAX_REQUEST_PIXELS

    def take(self, size: tuple[int, int], where: str) -> None:
        self.left -= size[0] * size[1]
        if self.left < 0:
            raise InputError(where, f"the request's images have more than {MAX_REQUEST_PIXELS:,} pixels in all "
                                    "(width x height); send fewer or smaller images per request")
