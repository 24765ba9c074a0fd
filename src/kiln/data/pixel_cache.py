"""Decoded image pixels, cached on disk by file content, decoded in parallel worker processes.

A store holds the uint8 pixels of images decoded one way (channels, size, resize policy) under
``$KILN_CACHE/images/<key of that way>/`` (default cache ``~/.cache/kiln``)::

    pixels.u8    rows of C x H x W bytes, appended, read memory-mapped
    index.json   sha256 of a file's bytes -> its row; and -> the reason, for files that do not decode

A file is found by the hash of its bytes, not its name: a renamed file is not decoded again, a changed one is.
Writers append under a lock (``lock``) and replace the index atomically after the rows are on disk, so a
reader sees only complete rows and two trainings on the same files may fill the store at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from kiln.errors import DataError
from kiln.fsutil import atomic_write_text

FORMAT = "kiln-pixels-1"
VERSION = 1  # of the decoding (fit_photo); a change of it starts new stores
PARALLEL_FROM = 64  # images to decode from which worker processes are worth their start


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode_bytes(data: bytes, channels: int, size: tuple[int, int], policy: str) -> np.ndarray:
    """One encoded image (JPEG/PNG/BMP/WebP/...) to uint8 (C, H, W); raises ValueError with the reason."""
    import io

    from PIL import Image, UnidentifiedImageError

    from kiln.data.pixels import fit_photo

    try:
        with Image.open(io.BytesIO(data)) as img:
            return fit_photo(img, channels, size, policy)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise ValueError(str(e) or type(e).__name__) from None


def _decode_files(job: tuple[list[str], int, tuple[int, int], str]) -> list[bytes | str]:
    """Worker: each file's pixel bytes, or the reason it does not decode (a str)."""
    paths, channels, size, policy = job
    out: list[bytes | str] = []
    for path in paths:
        try:
            out.append(decode_bytes(Path(path).read_bytes(), channels, size, policy).tobytes())
        except (ValueError, OSError) as e:
            out.append(str(e) or type(e).__name__)
    return out


def workers_for(setting: str | int, jobs: int) -> int:
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 16, jobs // PARALLEL_FROM or 1))


class PixelStore:
    """The store of one way of decoding (``shape`` = (C, H, W), ``policy``)."""

    def __init__(self, shape: tuple[int, int, int], policy: str, root: Path | None = None) -> None:
        self.shape, self.policy = tuple(int(v) for v in shape), policy
        key = hashlib.sha256(json.dumps([VERSION, self.shape, policy]).encode()).hexdigest()[:16]
        c, h, w = self.shape
        self.dir = (root or cache_root()) / "images" / f"{c}x{h}x{w}-{policy}-{key}"
        self.row_bytes = c * h * w
        self.rows: dict[str, int] = {}
        self.bad: dict[str, str] = {}
        self._read_index()

    def _read_index(self) -> None:
        index = self.dir / "index.json"
        if not index.is_file():
            return
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT or raw.get("shape") != list(self.shape):
                raise ValueError("another format")
            rows, bad = dict(raw["rows"]), dict(raw["bad"])
            size = (self.dir / "pixels.u8").stat().st_size
            if rows and (max(rows.values()) + 1) * self.row_bytes > size:
                raise ValueError("pixels.u8 is shorter than its index")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            rows, bad = {}, {}  # a damaged store is ignored (and replaced at the next write)
            self._damaged = True
        self.rows, self.bad = rows, bad

    def missing(self, hashes: list[str]) -> list[int]:
        """Positions in ``hashes`` of contents the store has neither decoded nor found unreadable."""
        return [i for i, h in enumerate(hashes) if h not in self.rows and h not in self.bad]

    def add(self, decoded: dict[str, bytes | str]) -> None:
        """Append decoded pixels (bytes) and reasons for unreadable files (str), by content hash."""
        import fcntl

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if getattr(self, "_damaged", False):
                (self.dir / "index.json").unlink(missing_ok=True)
                (self.dir / "pixels.u8").unlink(missing_ok=True)
                self._damaged = False
            self._read_index()  # what other writers added meanwhile
            new = [(h, v) for h, v in decoded.items() if h not in self.rows and h not in self.bad]
            pixels = self.dir / "pixels.u8"
            with open(pixels, "ab") as f:
                f.truncate((max(self.rows.values(), default=-1) + 1) * self.row_bytes)  # drop a crashed writer's tail
                f.seek(0, os.SEEK_END)
                row = f.tell() // self.row_bytes
                for h, v in new:
                    if isinstance(v, str):
                        self.bad[h] = v
                        continue
                    f.write(v)
                    self.rows[h] = row
                    row += 1
                f.flush()
                os.fsync(f.fileno())
            atomic_write_text(self.dir / "index.json", json.dumps(
                {"format": FORMAT, "shape": list(self.shape), "policy": self.policy, "rows": self.rows,
                 "bad": self.bad}))

    def pixels(self, hashes: list[str]) -> np.ndarray:
        """uint8 (N, C, H, W) of decoded contents, read from the memory-mapped store (a copy in memory)."""
        out = np.empty((len(hashes), *self.shape), dtype=np.uint8)
        if not hashes:
            return out
        rows = np.array([self.rows[h] for h in hashes], dtype=np.int64)
        mapped = np.memmap(self.dir / "pixels.u8", dtype=np.uint8, mode="r",
                           shape=(int(rows.max()) + 1, *self.shape))
        order = np.argsort(rows, kind="stable")  # read the file front to back
        out[order] = mapped[rows[order]]
        del mapped
        return out


def decode_into(store: PixelStore, paths: list[Path], hashes: list[str], workers: str | int,
                progress: Callable[[str], None] | None = None) -> tuple[int, int]:
    """Decode the files whose content the store lacks, in worker processes when there are many, and add them.
    Returns (images decoded, worker processes used)."""
    todo = store.missing(hashes)
    if not todo:
        return 0, 0
    c, h, w = store.shape
    files = [str(paths[i]) for i in todo]
    n_workers = workers_for(workers, len(files))
    if progress:
        progress(f"decoding {len(files):,} images to {c}x{h}x{w} ({store.policy}) with {n_workers} "
                 f"worker process{'es' if n_workers > 1 else ''}; cached in {store.dir}")
    if n_workers <= 1 or len(files) < PARALLEL_FROM:
        results = _decode_files((files, c, (h, w), store.policy))
        n_workers = 1
    else:
        chunk = max(16, -(-len(files) // (n_workers * 4)))
        jobs = [(files[i:i + chunk], c, (h, w), store.policy) for i in range(0, len(files), chunk)]
        # fork: the workers need nothing but this module's function, and start in milliseconds
        import multiprocessing

        ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        try:
            with ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
                results = [r for part in pool.map(_decode_files, jobs) for r in part]
        except OSError as e:
            raise DataError(f"could not start image decoding workers ({e}); set data.workers: 1") from None
    try:
        store.add({hashes[i]: r for i, r in zip(todo, results, strict=True)})
    except OSError as e:
        raise DataError(f"cannot write the image cache in {store.dir} ({e.strerror or e}); set KILN_CACHE to a "
                        "writable folder") from None
    return len(files), n_workers
