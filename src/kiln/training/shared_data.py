"""What a streamed kind of data fits (a table's preprocessing statistics, a text's tokenizer) computed once, by
rank 0, and handed to the other processes of a distributed run.

A streamed kind fits its statistics in one pass over all the training shards. Under ``kiln train --nproc N`` rank 0
alone makes that pass; it writes the kind's run files (``DataKind.save``: ``preprocessing.json``,
``tokenizer.json``) to a temporary folder and broadcasts their bytes over the process group (a tensor of UTF-8
JSON: no pickle); every other rank writes them to a temporary folder of its own and reopens the kind from it, as a
finished run reopens it. So means, vocabularies and PLE edges are the same bytes on every rank, whatever the
machines' floating-point summation order, and the shards are read once, not N times.

If rank 0 cannot open the data (a missing shard, a bad column), it sends the error instead, so the other ranks
stop with the same message rather than waiting for a broadcast that never comes.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import torch

from kiln.data.kind import DataKind, DataSpec, kind_class, open_kind
from kiln.errors import ConfigError, DataError, KilnError

_ERRORS = {"ConfigError": ConfigError, "DataError": DataError}


def shared_kind(data_cfg: DataSpec, seed: int, run_path: Path | None, dist, device: torch.device) -> DataKind:
    """``open_kind``, with a streamed kind's fitting done by rank 0 alone (see the module's description) when
    ``dist`` (a :class:`~kiln.training.distributed.Dist`) has several processes and the run starts afresh (a
    resumed run reopens its saved files on every rank)."""
    if run_path is not None or not dist.active or not kind_class(data_cfg.dataset).streams:
        return open_kind(data_cfg, seed, run_path)
    on = device if dist.backend == "nccl" else torch.device("cpu")
    if dist.rank == 0:
        try:
            kind = open_kind(data_cfg, seed)
            with tempfile.TemporaryDirectory(prefix="kiln-fitted-") as folder:
                kind.save(Path(folder))
                files = {f.name: base64.b64encode(f.read_bytes()).decode("ascii") for f in Path(folder).iterdir()
                         if f.is_file()}
        except BaseException as e:
            _send({"error": str(e), "type": type(e).__name__}, on)
            _both_have_it()
            raise
        _send({"files": files}, on)
        return kind
    message = _receive(on)
    if "error" in message:
        _both_have_it()
        raise _ERRORS.get(message["type"], KilnError)(message["error"])
    with tempfile.TemporaryDirectory(prefix="kiln-fitted-") as folder:
        for name, data in message["files"].items():
            if Path(name).name != name:
                raise KilnError(f"rank 0 sent a run file with a path in its name: {name!r}")
            (Path(folder) / name).write_bytes(base64.b64decode(data))
        return open_kind(data_cfg, seed, Path(folder))


def _both_have_it() -> None:
    """Rank 0's error has reached every rank before any of them ends: a rank that tears gloo down while a peer is
    still receiving aborts that peer (SIGABRT) instead of letting it print the error."""
    import torch.distributed as dist

    dist.barrier()


def _send(message: dict, device: torch.device) -> None:
    import torch.distributed as dist

    data = torch.frombuffer(bytearray(json.dumps(message).encode("utf-8")), dtype=torch.uint8)
    dist.broadcast(torch.tensor([len(data)], dtype=torch.int64, device=device), src=0)
    dist.broadcast(data.to(device), src=0)


def _receive(device: torch.device) -> dict:
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src=0)
    return json.loads(bytes(data.cpu().numpy()).decode("utf-8"))
