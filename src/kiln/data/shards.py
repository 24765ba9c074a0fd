"""Data bigger than memory: a folder, glob or list of shard files (Parquet or CSV) read as a stream of rows.

Shards are opened through ``pyarrow.dataset`` from a local path or an fsspec URL (``file://``, ``s3://``,
``gs://``, ``hdfs://``, ... where the user has installed the filesystem's package). Nothing here holds more
than one shuffle block of rows.

The order of one epoch is a function of (seed, epoch, rank, worker) alone:

1. the shards a reader owns are fixed: shard ``i`` (in sorted order) belongs to reader
   ``i % (world_size * workers)``, reader ``rank * workers + worker``; so every rank's row count is known
   before reading (from the Parquet footers, or a count of a CSV's lines);
2. each epoch shuffles the order of the reader's shards (seeded by seed, epoch and reader);
3. the reader's rows, in that shard order, are cut into consecutive blocks of ``block_rows`` rows, and each
   block is permuted by a generator seeded by (seed, epoch, reader, block index).

Row ``r`` of an epoch's stream is therefore fixed without reading anything before its block: resuming at row
``r`` skips whole shards by their row counts, reads from the start of ``r``'s block and drops the rows before
``r``. The data position of a checkpoint is simply the number of rows the reader has consumed, which the
trainer already keeps (steps done in the epoch x rows per step).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError, DataError

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
# fsspec protocols and the package a user installs for each (what an error names).
FS_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hdfs": "pyarrow (with libhdfs)",
               "abfs": "adlfs", "az": "adlfs", "http": "aiohttp", "https": "aiohttp", "sftp": "paramiko"}
READ_ROWS = 65_536  # rows per Arrow record batch read


def _arrow():
    try:
        import pyarrow as pa
        import pyarrow.dataset as ds
    except ImportError:
        raise DataError("reading shards needs pyarrow: pip install 'kiln[stream]'") from None
    return pa, ds


@dataclass
class Shard:
    path: str  # as the filesystem names it
    rows: int


class ShardSet:
    """The shards of one source, checked: each exists, is readable and has the first shard's columns."""

    def __init__(self, source: str, fmt: str = "auto") -> None:
        pa, _ = _arrow()
        self.source = source
        self.filesystem, paths = list_shards(source)
        if not paths:
            raise DataError(f"data.path {source!r}: no Parquet or CSV shards found")
        kinds = {FORMATS.get(Path(p).suffix.lower()) for p in paths} if fmt == "auto" else {fmt}
        if None in kinds or len(kinds) > 1:
            raise DataError(f"data.path {source!r}: the shards must all be Parquet (.parquet, .pq) or all CSV "
                            "(.csv); or set data.format")
        self.format = kinds.pop()
        self.schema = None
        self.shards: list[Shard] = []
        for path in paths:
            fragment = self._open(path)
            try:
                schema = fragment.schema
                rows = fragment.count_rows()
            except FileNotFoundError:
                raise DataError(f"shard {path}: no such file (listed, then gone)") from None
            except (OSError, ValueError, pa.ArrowException) as e:
                raise DataError(f"shard {path} is not a readable {self.format} file: {e}") from None
            if self.schema is None:
                self.schema, first = schema, path
            elif not schema.equals(self.schema):
                raise DataError(f"shard {path} has a different schema from {first}: "
                                f"{_schema_difference(self.schema, schema)}")
            self.shards.append(Shard(path, rows))

    def _open(self, path: str):
        pa, ds = _arrow()
        try:
            return ds.dataset(path, filesystem=self.filesystem, format=self.format)
        except FileNotFoundError:
            raise DataError(f"shard {path}: no such file") from None
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DataError(f"shard {path} is not a readable {self.format} file: {e}") from None

    def __len__(self) -> int:
        return len(self.shards)

    def batches(self, index: int, skip: int = 0, columns: list[str] | None = None) -> Iterator[Any]:
        """Arrow record batches of shard ``index`` from its row ``skip`` on."""
        pa, _ = _arrow()
        path = self.shards[index].path
        try:
            for batch in self._open(path).to_batches(columns=columns, batch_size=READ_ROWS):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                yield batch.slice(skip) if skip else batch
                skip = 0
        except FileNotFoundError:
            raise DataError(f"shard {path}: no such file (it was there when training started)") from None
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"shard {path}: {e}") from None


def list_shards(source: str, suffixes=tuple(FORMATS)) -> tuple[Any, list[str]]:
    """(a pyarrow filesystem, or None for local paths; the sorted shard paths) of a folder (its files with one of
    ``suffixes``), a glob, a file, a comma-separated list of them, or an fsspec URL of any of these."""
    if "://" in source and not source.startswith("file://"):
        return _remote(source, suffixes)
    path = source.removeprefix("file://")
    parts = [p.strip() for p in path.split(",") if p.strip()]
    found: list[str] = []
    for part in parts:
        p = Path(part).expanduser()
        if any(ch in part for ch in "*?["):
            matches = sorted(glob.glob(str(p), recursive=True))
            if not matches:
                raise DataError(f"data.path: {part!r} matches no file")
            found += [m for m in matches if os.path.isfile(m)]
        elif p.is_dir():
            found += sorted(str(f) for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes)
        elif p.is_file():
            found.append(str(p))
        else:
            raise DataError(f"shard {part}: no such file or folder")
    return None, found


def _remote(url: str, suffixes) -> tuple[Any, list[str]]:
    protocol = url.split("://", 1)[0].lower()
    try:
        import fsspec
    except ImportError:
        raise DataError(f"data.path {url!r}: reading URLs needs fsspec: pip install 'kiln[stream]' "
                        f"{FS_PACKAGES.get(protocol, '')}".rstrip()) from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        package = FS_PACKAGES.get(protocol, f"the fsspec filesystem package for {protocol}://")
        raise DataError(f"data.path {url!r}: reading {protocol}:// needs the package {package} "
                        f"(pip install {package.split()[0]})") from None
    except ValueError as e:  # an unknown protocol
        raise DataError(f"data.path {url!r}: {e}") from None
    try:
        if fs.isdir(path):
            paths = sorted(p for p in fs.find(path) if Path(p).suffix.lower() in suffixes)
        else:
            paths = sorted(fs.glob(path)) if any(ch in path for ch in "*?[") else [path]
    except (OSError, PermissionError) as e:
        raise DataError(f"data.path {url!r}: {e}") from None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs)), paths


def read_bytes(filesystem, path: str) -> bytes:
    """A whole shard file's bytes, from a local path or through ``filesystem``."""
    try:
        if filesystem is None:
            return Path(path).read_bytes()
        with filesystem.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        raise DataError(f"shard {path}: no such file") from None
    except OSError as e:
        raise DataError(f"shard {path}: {e}") from None


def _schema_difference(a, b) -> str:
    names_a, names_b = a.names, b.names
    if names_a != names_b:
        missing, extra = [n for n in names_a if n not in names_b], [n for n in names_b if n not in names_a]
        said = [f"lacks {', '.join(missing)}" if missing else "", f"adds {', '.join(extra)}" if extra else ""]
        return "; ".join(s for s in said if s) or "its columns are in another order"
    return "; ".join(f"column {n!r} is {b.field(n).type}, not {a.field(n).type}"
                     for n in names_a if not a.field(n).type.equals(b.field(n).type))


def reader_shards(shards: list[int], rank: int = 0, world_size: int = 1, worker: int = 0, workers: int = 1
                  ) -> list[int]:
    """The shards (indices into ``shards``' order) that reader (rank, worker) owns: every
    ``world_size * workers``-th one, so that readers share out whole shards and none is read twice."""
    readers = world_size * workers
    if not (0 <= rank < world_size and 0 <= worker < workers):
        raise ValueError(f"reader (rank {rank} of {world_size}, worker {worker} of {workers}) does not exist")
    if len(shards) < readers:
        most = len(shards) // workers
        raise ConfigError(f"data: {len(shards)} training shards cannot be shared among {world_size} processes x "
                          f"{workers} readers (--nproc x data.workers); every reader needs a shard of its own: use "
                          + (f"at most {most} processes" + (" with these readers" if workers > 1 else "")
                             if most else f"at most {len(shards)} readers") + ", or split the files further")
    me = rank * workers + worker
    return [s for i, s in enumerate(shards) if i % readers == me]


def _generator(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(list(key)))


def stream_rows(read: Callable[[int, int], Iterator[tuple[np.ndarray, ...]]], counts: list[int], owned: list[int], *,
                seed: int, epoch: int, reader: int, block_rows: int, start: int = 0
                ) -> Iterator[tuple[np.ndarray, ...]]:
    """The rows of one epoch for one reader, from row ``start`` on, in shuffled blocks (see the module's
    description). ``read(shard, skip)`` yields a shard's rows from row ``skip`` on as tuples of equally long
    arrays (e.g. model inputs and targets); ``counts[shard]`` is its row count. Yields one array tuple per block
    (the first one cut at ``start``)."""
    order = [owned[i] for i in _generator(seed, epoch, reader, 0).permutation(len(owned))]
    block = start // block_rows
    skip = block * block_rows  # rows before the first block read
    pending: list[tuple[np.ndarray, ...]] = []
    held = 0
    for index in order:
        if skip >= counts[index]:
            skip -= counts[index]
            continue
        for arrays in read(index, skip):
            skip = 0
            pending.append(arrays)
            held += len(arrays[0])
            while held >= block_rows:
                arrays, pending, held = _take(pending, block_rows, held)
                yield _shuffled(arrays, seed, epoch, reader, block, start - block * block_rows)
                block, start = block + 1, (block + 1) * block_rows
        skip = 0
    if held:
        arrays, pending, held = _take(pending, held, held)
        yield _shuffled(arrays, seed, epoch, reader, block, start - block * block_rows)


def table_reader(shard_set: ShardSet, convert: Callable[[Any], tuple[np.ndarray, ...]], columns: list[str]):
    """``stream_rows``' ``read`` for table shards: Arrow record batches converted to arrays."""
    def read(index: int, skip: int) -> Iterator[tuple[np.ndarray, ...]]:
        return (convert(batch) for batch in shard_set.batches(index, skip, columns))
    return read


def _take(pending: list[tuple[np.ndarray, ...]], n: int, held: int):
    """The first ``n`` rows of the pending arrays, and what is left."""
    joined = tuple(np.concatenate(parts) for parts in zip(*pending, strict=True))
    head = tuple(a[:n] for a in joined)
    rest = [tuple(a[n:] for a in joined)] if held > n else []
    return head, rest, held - n


def _shuffled(arrays: tuple[np.ndarray, ...], seed: int, epoch: int, reader: int, block: int, drop: int):
    perm = _generator(seed, epoch, reader, block + 1).permutation(len(arrays[0]))[drop:]
    return tuple(a[perm] for a in arrays)
