"""The ``mnist`` and ``fashion_mnist`` kinds of data: four IDX files of 28x28 grey images in ten classes, found
(or downloaded into a cache), verified and loaded as uint8 images. Both sets share this one path; they differ
only in their files' checksums, mirrors, folder and class names (``IdxSet``).

Files are verified by the sha256 of their *decompressed* content: mirrors (and the shared test
copy) hold the same IDX bytes inside differently compressed .gz archives.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from kiln.data.download import download_verified
from kiln.data.images import ImageKind, ImageSpec
from kiln.data.splits import Splits, holdout
from kiln.errors import DataError
from kiln.registry import KINDS

# split key -> (file name, sha256 of the decompressed content)
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train_images": (
        "train-images-idx3-ubyte.gz",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train_labels": (
        "train-labels-idx1-ubyte.gz",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "test_images": (
        "t10k-images-idx3-ubyte.gz",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte.gz",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

# Base URLs, tried in order; each holds the four files under their MNIST_FILES names.
MNIST_MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

IMAGE_SIDE = 28  # pixels
NUM_CLASSES = 10
_IDX_UBYTE = 0x08  # IDX type code for unsigned bytes, the only type MNIST uses


@dataclass(frozen=True)
class IdxSet:
    """One data set stored as MNIST's four IDX files."""

    title: str  # how messages name it
    folder: str  # its subfolder of a data root and of the download cache
    files: dict[str, tuple[str, str]]  # split key -> (file name, sha256 of the decompressed content)
    mirrors: tuple[str, ...]
    class_names: tuple[str, ...]


MNIST = IdxSet("MNIST", "mnist", MNIST_FILES, MNIST_MIRRORS, tuple(str(d) for d in range(NUM_CLASSES)))
# Zalando's Fashion-MNIST: the same layout and file names, clothing instead of digits (MIT licence).
FASHION_MNIST = IdxSet(
    "Fashion-MNIST", "fashion_mnist",
    {
        "train_images": ("train-images-idx3-ubyte.gz",
                         "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train_labels": ("train-labels-idx1-ubyte.gz",
                         "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "test_images": ("t10k-images-idx3-ubyte.gz",
                        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "test_labels": ("t10k-labels-idx1-ubyte.gz",
                        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)


class MnistData(ImageSpec):
    dataset: Literal["mnist"] = "mnist"
    download: bool = True  # fetch missing files from public mirrors (checksums verified)


class FashionMnistData(ImageSpec):
    dataset: Literal["fashion_mnist"]
    download: bool = True


@KINDS.register("mnist")
class Mnist(ImageKind):
    """Grey 28x28 digits, ten classes; the test split is MNIST's own 10,000 images."""

    Config = MnistData
    idx_set: ClassVar[IdxSet] = MNIST
    input_shape: ClassVar[tuple[int, ...]] = (1, IMAGE_SIDE, IMAGE_SIDE)
    class_names: ClassVar[list[str]] = list(MNIST.class_names)

    def load(self, progress=None) -> Splits:
        cfg = self.cfg
        arrays = load_mnist(cfg.root, download=cfg.download, progress=progress, idx_set=self.idx_set)
        x, y = arrays.train_images, arrays.train_labels
        if cfg.limit_train:
            x, y = x[: cfg.limit_train], y[: cfg.limit_train]
        tx, ty = arrays.test_images, arrays.test_labels
        if cfg.limit_test:
            tx, ty = tx[: cfg.limit_test], ty[: cfg.limit_test]
        tr, va = holdout(len(x), cfg.val_fraction, self.seed)
        return Splits(x[tr].unsqueeze(1), y[tr], x[va].unsqueeze(1), y[va], tx.unsqueeze(1), ty,
                      dict(arrays.checksums))


    def explain_inputs(self, paths: list[str | Path]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
        """Image and .npy files as `kiln predict` reads them, and IDX files of images (``*-idx3-ubyte``, gzipped or
        not, as MNIST ships them): each of their images an input."""
        images, items = [], []
        for path in map(Path, paths):
            if "-idx3-ubyte" not in path.name:
                x, more = super().explain_inputs([path])
                images.append(x)
                items += more
                continue
            x = torch.from_numpy(read_idx(path, 3))
            if tuple(x.shape[1:]) != tuple(self.input_shape[1:]):
                raise DataError(f"{path} holds {x.shape[1]}x{x.shape[2]} images; this run reads "
                                f"{self.input_shape[1]}x{self.input_shape[2]}")
            images.append(x.unsqueeze(1))
            stem = path.name.split("-idx3-ubyte")[0]
            items += [{"name": f"{stem}_{k}", "file": str(path), "index": k} for k in range(len(x))]
        return torch.cat(images), items


@KINDS.register("fashion_mnist")
class FashionMnist(Mnist):
    """Grey 28x28 photos of clothing in ten classes, read through the same IDX path as MNIST."""

    Config = FashionMnistData
    idx_set: ClassVar[IdxSet] = FASHION_MNIST
    class_names: ClassVar[list[str]] = list(FASHION_MNIST.class_names)


@dataclass(frozen=True)
class MnistArrays:
    """The four MNIST arrays, plus the checksums a run manifest records."""

    train_images: torch.Tensor  # uint8 (60000, 28, 28), pixel values 0..255
    train_labels: torch.Tensor  # int64 (60000,), digits 0..9
    test_images: torch.Tensor  # uint8 (10000, 28, 28)
    test_labels: torch.Tensor  # int64 (10000,)
    checksums: dict[str, str]  # file name -> sha256 of its decompressed content


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """Read a gzip (``.gz``) or raw IDX file of unsigned bytes with ``expected_ndim`` dimensions.

    Raises DataError naming the file when it is unreadable, not valid gzip, has the wrong magic
    number, or holds more or fewer data bytes than its header's dimensions say.
    """
    path = Path(path)
    return _parse_idx(_read_content(path), path, expected_ndim)


def resolve_mnist_dir(
    root: str | Path | None,
    *,
    download: bool = True,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    idx_set: IdxSet = MNIST,
) -> Path:
    """Return the directory holding the four MNIST files (or another ``idx_set``'s; its folder for ``mnist/``).

    Looks, in order, at ``root`` (the config key ``data.root``), the ``KILN_DATA`` environment
    variable, then the cache ``<cache>/mnist`` where ``<cache>`` is ``cache_dir``, else ``KILN_CACHE``,
    else ``~/.cache/kiln``. A root may hold the files directly or in a ``mnist/`` subfolder. Only the
    cache is ever downloaded into (when ``download``), and only files missing there are fetched:
    nothing touches the network when the files are present. A root that lacks files is an error,
    not a reason to fall through to the cache, so a mistyped path never goes unnoticed.

    Files found here are not yet verified; ``load_mnist`` verifies them.
    """
    mirrors = idx_set.mirrors if idx_set is not MNIST and mirrors is MNIST_MIRRORS else mirrors
    if root is not None:
        return _given_dir(Path(root).expanduser(), "data.root", cache_dir, idx_set)
    if os.environ.get("KILN_DATA"):
        return _given_dir(Path(os.environ["KILN_DATA"]).expanduser(), "KILN_DATA", cache_dir, idx_set)
    return _cached_dir(cache_dir, download, mirrors, progress, idx_set)


def load_mnist(
    root: str | Path | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    mirrors: tuple[str, ...] = MNIST_MIRRORS,
    cache_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    idx_set: IdxSet = MNIST,
) -> MnistArrays:
    """Find (see ``resolve_mnist_dir``), check and load MNIST.

    With ``verify`` a file whose decompressed sha256 differs from MNIST_FILES raises DataError; a
    corrupted file, cached or not, is refused rather than re-downloaded, so the user sees it (the
    message says to delete it, after which a cached copy is fetched again). Checksums are computed
    either way and returned for the run manifest. Each file is decompressed once; the hash and the
    arrays come from the same bytes.
    """
    directory = resolve_mnist_dir(
        root, download=download, mirrors=mirrors, cache_dir=cache_dir, progress=progress, idx_set=idx_set
    )
    arrays: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for key, (name, expected) in idx_set.files.items():
        path = directory / name
        content = _read_content(path)
        checksums[name] = hashlib.sha256(content).hexdigest()
        if verify and checksums[name] != expected:
            raise DataError(
                f"{path} fails its checksum: the sha256 of its decompressed content is "
                f"{checksums[name]}, expected {expected}. The file is corrupted or is not the standard "
                f"{idx_set.title} file: delete or replace it (a deleted cached file is downloaded again), "
                "or load with verify=False to use it as it is."
            )
        arrays[key] = _parse_idx(content, path, expected_ndim=3 if key.endswith("images") else 1)
    _check_consistent(arrays, directory, idx_set)
    return MnistArrays(
        train_images=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"].astype(np.int64)),
        checksums=checksums,
    )


def _read_content(path: Path) -> bytes:
    """The file's IDX bytes: gunzipped when the name ends in ``.gz``, as stored otherwise."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}") from None
    return _gunzip(raw, path) if path.suffix == ".gz" else raw


def _gunzip(raw: bytes, path: Path) -> bytes:
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is not a valid gzip file: {error}") from None


def _parse_idx(content: bytes, path: Path, expected_ndim: int) -> np.ndarray:
    """Check an IDX header against ``expected_ndim`` and the data length; return a writable array."""
    header_bytes = 4 + 4 * expected_ndim  # magic number, then one uint32 per dimension
    magic = int.from_bytes(content[:4], "big")
    expected_magic = (_IDX_UBYTE << 8) | expected_ndim
    if len(content) >= 4 and magic != expected_magic:
        raise DataError(
            f"{path} is not an IDX file of {expected_ndim}-D unsigned bytes: its magic number is "
            f"0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    if len(content) < header_bytes:
        raise DataError(
            f"{path} is truncated: an IDX header of {expected_ndim} dimensions needs "
            f"{header_bytes} bytes, found {len(content)}"
        )
    dims = struct.unpack(f">{expected_ndim}I", content[4:header_bytes])
    expected_bytes = math.prod(dims)
    found_bytes = len(content) - header_bytes
    if found_bytes != expected_bytes:
        problem = "truncated" if found_bytes < expected_bytes else "longer than its header says"
        raise DataError(
            f"{path} is {problem}: dimensions {'x'.join(map(str, dims))} need "
            f"{expected_bytes} bytes of data, found {found_bytes}"
        )
    # frombuffer over `bytes` is read-only; the copy gives tensors memory they may write.
    data = np.frombuffer(content, dtype=np.uint8, count=expected_bytes, offset=header_bytes)
    return data.reshape(dims).copy()


def _check_consistent(arrays: dict[str, np.ndarray], directory: Path, idx_set: IdxSet) -> None:
    """Catch files that parse but do not belong together (matters when verify=False)."""
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(
                f"{directory / idx_set.files[f'{split}_images'][0]}: images are "
                f"{images.shape[1]}x{images.shape[2]} pixels, expected {IMAGE_SIDE}x{IMAGE_SIDE}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{idx_set.title} {split} split in {directory}: {len(images)} images but {len(labels)} labels"
            )
        if labels.max(initial=0) >= NUM_CLASSES:
            raise DataError(
                f"{directory / idx_set.files[f'{split}_labels'][0]}: label {labels.max()} is outside "
                f"0..{NUM_CLASSES - 1}"
            )


def _missing(directory: Path, idx_set: IdxSet) -> list[str]:
    return [name for name, _ in idx_set.files.values() if not (directory / name).is_file()]


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def _given_dir(root: Path, source: str, cache_dir: Path | None, idx_set: IdxSet) -> Path:
    """``root`` or ``root/<folder>``, whichever holds all four files; DataError saying what is missing."""
    candidates = (root, root / idx_set.folder)
    for directory in candidates:
        if not _missing(directory, idx_set):
            return directory
    closest = min(candidates, key=lambda directory: len(_missing(directory, idx_set)))
    raise DataError(
        f"{idx_set.title} files missing from {closest} (from {source}={root}): "
        f"{', '.join(_missing(closest, idx_set))}. Fix: point KILN_DATA or data.root at a directory holding the "
        f"four {idx_set.title} .gz files (directly or in a {idx_set.folder}/ subfolder), or unset both to "
        f"download them into {_cache_root(cache_dir) / idx_set.folder}."
    )


def _cached_dir(
    cache_dir: Path | None,
    download: bool,
    mirrors: tuple[str, ...],
    progress: Callable[[str], None] | None,
    idx_set: IdxSet,
) -> Path:
    """The cache's folder of the set, with missing files downloaded (verified) when allowed."""
    directory = _cache_root(cache_dir) / idx_set.folder
    missing = _missing(directory, idx_set)
    if missing and not download:
        raise DataError(
            f"{idx_set.title} files missing from the cache {directory}: {', '.join(missing)}, and download "
            "is off. Fix: allow download, or set KILN_DATA or data.root to a directory holding them."
        )
    for name, sha256 in idx_set.files.values():
        if name in missing:
            urls = [base.rstrip("/") + "/" + name for base in mirrors]
            verify = _content_verifier(sha256)
            download_verified(urls, directory / name, verify=verify, progress=progress)
    return directory


def _content_verifier(expected: str) -> Callable[[Path], None]:
    """A check for download_verified: the gunzipped download must have sha256 ``expected``.

    The download lands in a ``.part`` file, so it is gunzipped regardless of its name.
    """

    def verify(path: Path) -> None:
        actual = hashlib.sha256(_gunzip(path.read_bytes(), path)).hexdigest()
        if actual != expected:
            raise DataError(f"decompressed content has sha256 {actual}, expected {expected}")

    return verify
