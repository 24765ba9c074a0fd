"""The ``images`` kind of data: your own photos or scans, as a folder with one subfolder per class or as a CSV of
``path,label`` rows.

- A folder with ``train/`` and ``test/`` subfolders takes its test split from ``test/``; otherwise a stratified
  ``test_fraction`` of the images is held out. Validation is a stratified ``val_fraction`` of the training images.
  A CSV may say the split of each row in a ``split`` column (train or test).
- JPEG, PNG, BMP, WebP, GIF, TIFF... of any size and mode are read with Pillow and fitted to ``image_size`` and
  ``channels`` by the ``resize`` policy (:func:`kiln.data.pixels.fit_photo`).
- Decoding runs once, in worker processes; the decoded pixels are cached by file content
  (:mod:`kiln.data.pixel_cache`), so later epochs, evaluations and runs on the same files decode nothing.
- Model input is the pixels scaled to [0, 1] and normalised per channel with the mean and standard deviation of
  the training split, saved in the run directory (``images.json``) with the classes and the input shape.
- Augmentation (``augment``): random resized crop, horizontal flip, shift/rotate/scale, colour jitter and
  cutout, as batched tensor operations.
"""

from __future__ import annotations

import csv
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from kiln.data.images import AugmentConfig, ImageKind, ImageSpec
from kiln.data.kind import find_data
from kiln.data.pixel_cache import PixelStore, content_hash, decode_into
from kiln.data.pixels import PIXEL_SCALE, cutout, fit_photo, photo_augment
from kiln.data.splits import Splits, stratified_holdout
from kiln.errors import DataError, RunDirError
from kiln.fsutil import atomic_write_text
from kiln.registry import KINDS, did_you_mean
from kiln.rundir import RunDir
from kiln.schema import Pair, PositivePair

IMAGES_FILE = "images.json"  # in the run directory
FORMAT = "kiln-images-1"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
SHOWN = 20  # skipped file names printed in the log (all are in images.json)


class PhotoAugment(AugmentConfig):
    """Random training-time changes of photos (besides shift, rotate and scale of every image kind)."""

    crop_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # random resized crop: smallest area kept (1: off)
    crop_ratio: Pair[float] = (3 / 4, 4 / 3)  # its range of aspect ratios (width / height)
    flip: bool = False  # horizontal flip, half of the images
    brightness: float = Field(default=0.0, ge=0.0, le=1.0)  # colour jitter: factors in [1 - v, 1 + v]
    contrast: float = Field(default=0.0, ge=0.0, le=1.0)
    saturation: float = Field(default=0.0, ge=0.0, le=1.0)
    cutout: float = Field(default=0.0, ge=0.0, le=1.0)  # side of a square set to the mean colour, of the size


class ImagesData(ImageSpec):
    dataset: Literal["images"] = "images"
    path: str  # a folder (one subfolder per class, or train/ and test/ holding those) or a CSV of path,label
    image_size: PositiveInt | PositivePair | None = None  # (height, width) or one side; default: the first image's
    channels: Literal[1, 3] = 3
    resize: Literal["crop", "stretch", "pad"] = "crop"  # fitting other sizes: centre crop, stretch, or pad
    normalize: bool = True  # per-channel mean and std of the training split (else pixels in [0, 1])
    test_fraction: float = Field(default=0.2, gt=0.0, lt=1.0)  # held out when there is no test/ folder or split
    classes: list[str] | None = None  # the classes expected; a label or folder outside them is an error
    bad_images: Literal["error", "skip"] = "error"  # an unreadable or truncated image: stop, or skip and report
    workers: Literal["auto"] | PositiveInt = "auto"  # decoding processes (auto: the CPUs, for many images)
    path_column: str = "path"  # CSV: the column of image paths (relative to the CSV's folder)
    label_column: str = "label"  # CSV: the column of class labels
    augment: PhotoAugment = PhotoAugment()


class Listing:
    """The image files and their labels, by split as given (test may be None: held out later)."""

    def __init__(self, train: list[tuple[Path, str, str]], test: list[tuple[Path, str, str]] | None,
                 source: Path) -> None:
        self.train, self.test, self.source = train, test, source  # (path, label, where) triples


def _class_folders(folder: Path, what: str) -> list[tuple[Path, str, str]]:
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{what} {folder} has no class subfolders; give one folder per class holding its images, "
                        "or a CSV of path,label")
    items = []
    for c in classes:
        files = sorted(p for p in c.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(f"class folder {c} holds no images ({', '.join(IMAGE_SUFFIXES)}): add images or remove "
                            "the folder")
        items += [(p, c.name, str(p)) for p in files]
    return items


def list_folder(folder: Path) -> Listing:
    train, test = folder / "train", folder / "test"
    if train.is_dir() and test.is_dir():
        return Listing(_class_folders(train, "folder"), _class_folders(test, "folder"), folder)
    return Listing(_class_folders(folder, "folder"), None, folder)


def list_csv(path: Path, cfg: ImagesData) -> Listing:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({e})") from None
    reader = csv.DictReader(text.splitlines())
    columns = reader.fieldnames or []
    for key, name in (("path_column", cfg.path_column), ("label_column", cfg.label_column)):
        if name not in columns:
            raise DataError(f"data.{key}: {path} has no column {name!r}{did_you_mean(name, columns)}; its header "
                            f"is {', '.join(columns) or '(empty)'}. The CSV needs a header naming a path and a "
                            "label column")
    train, test = [], []
    for n, row in enumerate(reader, start=2):
        where = f"{path}, line {n}"
        file, label = (row.get(cfg.path_column) or "").strip(), (row.get(cfg.label_column) or "").strip()
        if not file or not label:
            raise DataError(f"{where}: the {'path' if not file else 'label'} is empty")
        image = Path(file).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise DataError(f"{where}: image {file!r} not found (looked at {image}); paths are relative to the "
                            "CSV's folder")
        split = (row.get("split") or "train").strip().lower()
        if split not in ("train", "test"):
            raise DataError(f"{where}: split {split!r} must be train or test")
        (train if split == "train" else test).append((image, label, where))
    if not train:
        raise DataError(f"{path} lists no training images")
    return Listing(train, test or None, path)


def limit(items: list, n: int | None) -> list:
    """The first ``n`` items taking the classes in turn (the first image of each class, then the second...)."""
    if not n or n >= len(items):
        return items
    rank: dict[str, int] = {}
    keyed = []
    for i, item in enumerate(items):
        rank[item[1]] = rank.get(item[1], -1) + 1
        keyed.append((rank[item[1]], item[1], i))
    return [items[i] for _, _, i in sorted(keyed)[:n]]


@KINDS.register("images")
class ImageFolders(ImageKind):
    """Your own images: one class per subfolder or per CSV label, any size and format, decoded once and cached."""

    Config = ImagesData
    run_files: ClassVar[tuple[str, ...]] = (IMAGES_FILE,)
    image_formats: ClassVar[list[str]] = ["PNG", "JPEG", "BMP", "WEBP", "GIF", "TIFF"]

    def __init__(self, cfg: ImagesData, seed: int, run_path: Path | None = None) -> None:
        super().__init__(cfg, seed)
        self.skipped: list[str] = []
        self.counts: dict[str, Any] = {}
        self.reopened = run_path is not None  # the normalisation is the run's, never fitted again
        if run_path is not None:
            saved = RunDir(run_path) / IMAGES_FILE
            if not saved.is_file():
                raise RunDirError(f"{run_path} has no {IMAGES_FILE}: it is not a finished image-folder run")
            info = _read_saved(saved)
            self.class_names = list(info["classes"])
            self.input_shape = tuple(info["shape"])
            self.mean, self.std = info["mean"], info["std"]
            self.skipped = list(info["skipped"])
            return
        listing = self.listing
        labels = sorted({label for _, label, _ in listing.train})
        if cfg.classes is not None:
            for _, label, where in listing.train + (listing.test or []):
                if label not in cfg.classes:
                    raise DataError(f"{where}: label {label!r} is not one of data.classes "
                                    f"({', '.join(cfg.classes)}){did_you_mean(label, cfg.classes)}")
            missing = [c for c in cfg.classes if c not in labels]
            if missing:
                raise DataError(f"data.classes: {', '.join(map(repr, missing))} has no training images in "
                                f"{listing.source}")
            labels = list(cfg.classes)
        for _, label, where in listing.test or []:
            if label not in labels:
                raise DataError(f"{where}: test label {label!r} is not a class of the training images "
                                f"({', '.join(labels)}){did_you_mean(label, labels)}")
        if len(labels) < 2:
            raise DataError(f"{listing.source}: one class only ({labels[0]!r}); a classifier needs at least two")
        self.class_names = labels
        self.input_shape = (cfg.channels, *self._size(listing.train[0][0]))
        self.mean, self.std = [0.0] * cfg.channels, [1.0] * cfg.channels

    @cached_property
    def listing(self) -> Listing:
        source = find_data(self.cfg.path, self.cfg.root, "a folder of class subfolders or a CSV of path,label")
        return list_csv(source, self.cfg) if source.is_file() else list_folder(source)

    def _size(self, first: Path) -> tuple[int, int]:
        size = self.cfg.image_size
        if size is None:
            from PIL import Image

            try:
                with Image.open(first) as img:
                    w, h = img.size
            except (OSError, ValueError) as e:
                raise DataError(f"data.image_size is not set and the first image, {first}, cannot be read to take "
                                f"its size ({e}); set data.image_size") from None
            return (h, w)
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    # ---- what a run is -------------------------------------------------------------------------

    def report(self) -> list[str]:
        c, h, w = self.input_shape
        k = self.counts
        lines = [f"images {self.cfg.path}: {len(self.class_names)} classes, {c}x{h}x{w} ({self.cfg.resize}); "
                 f"train {k.get('train', 0):,}, val {k.get('val', 0):,}, test {k.get('test', 0):,} images; "
                 f"decoded {k.get('decoded', 0):,} ({k.get('workers', 0)} processes), "
                 f"{k.get('cached', 0):,} from the cache"]
        if self.cfg.normalize:
            lines.append("per-channel mean " + ", ".join(f"{m:.4f}" for m in self.mean) + "; std "
                         + ", ".join(f"{s:.4f}" for s in self.std) + " (training split)")
        if self.skipped:
            shown = ", ".join(self.skipped[:SHOWN]) + (f" and {len(self.skipped) - SHOWN} more" if len(
                self.skipped) > SHOWN else "")
            lines.append(f"skipped {len(self.skipped)} unreadable image(s) (data.bad_images: skip; listed in "
                         f"{IMAGES_FILE}): {shown}")
        return lines

    def save(self, run_path: Path) -> None:
        atomic_write_text(run_path / IMAGES_FILE, json.dumps({
            "format": FORMAT, "classes": self.class_names, "shape": list(self.input_shape),
            "resize": self.cfg.resize, "mean": self.mean, "std": self.std, "skipped": self.skipped,
            "counts": self.counts}, indent=2) + "\n")

    # ---- data ----------------------------------------------------------------------------------

    def load(self, progress=None) -> Splits:
        cfg, listing = self.cfg, self.listing
        train_items = limit(listing.train, cfg.limit_train)
        test_items = limit(listing.test, cfg.limit_test) if listing.test is not None else None
        items = train_items + (test_items or [])
        x, ok, digest = self._pixels(items, progress)
        index = {name: i for i, name in enumerate(self.class_names)}
        y = torch.tensor([index.get(label, -1) for _, label, _ in items], dtype=torch.int64)
        if (y < 0).any():
            i = int(torch.nonzero(y < 0)[0])
            raise DataError(f"{items[i][2]}: label {items[i][1]!r} is not a class of this run "
                            f"({', '.join(self.class_names)}); the data changed since training")
        n_train = len(train_items)
        train_idx = [i for i in range(n_train) if ok[i]]
        if test_items is not None:
            test_idx = [i for i in range(n_train, len(items)) if ok[i]]
        else:
            labels = [int(y[i]) for i in train_idx]
            rest, held = stratified_holdout(labels, cfg.test_fraction, self.seed)
            train_idx, test_idx = [train_idx[i] for i in rest], [train_idx[i] for i in held]
        part, val = stratified_holdout([int(y[i]) for i in train_idx], cfg.val_fraction, self.seed + 1)
        val_idx, train_idx = [train_idx[i] for i in val], [train_idx[i] for i in part]
        for name in self.class_names:
            if not any(self.class_names[int(y[i])] == name for i in train_idx):
                raise DataError(f"class {name!r} has no training images left (after the test and validation "
                                "splits, and skipped unreadable files); give it more images")

        def take(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
            t = torch.tensor(idx, dtype=torch.int64)
            return x[t], y[t]

        splits = Splits(*take(train_idx), *take(val_idx), *take(test_idx), {listing.source.name: digest})
        self.counts.update(train=len(train_idx), val=len(val_idx), test=len(test_idx))
        if cfg.normalize and not self.reopened:
            self.mean, self.std = channel_stats(splits.train_x)
        return splits

    def _pixels(self, items: list[tuple[Path, str, str]], progress) -> tuple[torch.Tensor, list[bool], str]:
        """uint8 (N, C, H, W) of every item (zeros for skipped ones), which decoded, and a digest of all contents."""
        hashes = []
        for path, _, where in items:
            try:
                hashes.append(content_hash(path.read_bytes()))
            except OSError as e:
                raise DataError(f"{where}: cannot read {path} ({e.strerror})") from None
        store = PixelStore(self.input_shape, self.cfg.resize)
        decoded, workers = decode_into(store, [p for p, _, _ in items], hashes, self.cfg.workers, progress)
        self.counts.update(decoded=decoded, cached=len(items) - decoded, workers=workers)
        bad = [(i, store.bad[h]) for i, h in enumerate(hashes) if h in store.bad]
        if bad and self.cfg.bad_images == "error":
            shown = "; ".join(f"{items[i][2]}: {why}" for i, why in bad[:5])
            raise DataError(f"{len(bad)} image(s) cannot be read: {shown}{' ...' if len(bad) > 5 else ''}. Fix or "
                            "remove them, or set data.bad_images: skip to train without them")
        ok = [h in store.rows for h in hashes]
        self.skipped = [str(items[i][0]) for i, _ in bad]
        good = [h for h in hashes if h in store.rows]
        x = np.zeros((len(items), *self.input_shape), dtype=np.uint8)
        x[np.array(ok, dtype=bool)] = store.pixels(good)
        listing = "\n".join(f"{h} {label}" for h, (_, label, _) in zip(hashes, items, strict=True))
        return torch.from_numpy(x), ok, hashlib.sha256(listing.encode()).hexdigest()

    # ---- model input ---------------------------------------------------------------------------

    def _affine(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (C, 1, 1): model input = pixels * scale + shift."""
        mean = torch.tensor(self.mean if self.cfg.normalize else [0.0] * len(self.mean), dtype=torch.float32)
        std = torch.tensor(self.std if self.cfg.normalize else [1.0] * len(self.std), dtype=torch.float32)
        return ((1.0 / (PIXEL_SCALE * std)).view(-1, 1, 1).to(device), (-mean / std).view(-1, 1, 1).to(device))

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self._affine(x.device)
        return x.to(torch.float32) * scale + shift

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a = self.cfg.augment
        photo = a.crop_scale < 1.0 or a.flip or a.shift or a.rotate or a.scale or a.brightness or a.contrast \
            or a.saturation
        if photo:
            scale, shift = self._affine(x.device)
            x = photo_augment((x - shift) / (scale * PIXEL_SCALE), a, gen)  # in [0, 1], then back
            x = x * (scale * PIXEL_SCALE) + shift
        return cutout(x, a.cutout, gen) if a.cutout else x

    def fit(self, img) -> np.ndarray:
        c, h, w = self.input_shape
        return fit_photo(img, c, (h, w), self.cfg.resize)


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) pixels, scaled to [0, 1]."""
    c = x.shape[1]
    total, squares, count = np.zeros(c), np.zeros(c), 0
    for start in range(0, len(x), 1024):
        part = x[start:start + 1024].numpy().astype(np.float64) / PIXEL_SCALE
        total += part.sum(axis=(0, 2, 3))
        squares += np.square(part).sum(axis=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0.0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) if s > 1e-6 else 1.0 for s in std]


def _read_saved(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"format is not {FORMAT!r}")
        classes, shape, mean, std = raw["classes"], raw["shape"], raw["mean"], raw["std"]
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) >= 2):
            raise ValueError("classes must be a list of at least two names")
        if not (isinstance(shape, list) and len(shape) == 3 and shape[0] in (1, 3)
                and all(isinstance(v, int) and 0 < v <= 65536 for v in shape)):
            raise ValueError("shape must be [channels (1 or 3), height, width]")
        for name, v in (("mean", mean), ("std", std)):
            if not (isinstance(v, list) and len(v) == shape[0] and all(isinstance(f, int | float) for f in v)):
                raise ValueError(f"{name} must hold one number per channel")
        if any(s <= 0 for s in std):
            raise ValueError("std must be positive")
        if not isinstance(raw.get("skipped", []), list):
            raise ValueError("skipped must be a list")
        return {"classes": classes, "shape": shape, "mean": [float(m) for m in mean],
                "std": [float(s) for s in std], "skipped": raw.get("skipped", [])}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path} is not a kiln image-folder file: {e}") from None
