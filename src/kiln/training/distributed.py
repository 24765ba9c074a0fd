"""Training on many processes and machines with PyTorch's own distributed engine (torch.distributed).

``kiln train CONFIG --nproc N`` starts N workers through torchrun (:func:`launch`); each worker runs the usual
training with a :class:`Dist` that the trainer, the session and the checkpoint code ask at a few points:

- the process group: gloo on a CPU, nccl on CUDA (each worker on the GPU of its local rank), from torchrun's
  environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``);
- wrapping: ``train.parallel`` ddp (``DistributedDataParallel``), fsdp (FSDP2: ``fully_shard`` per block, blocks
  that share a parameter sharded together, then the root), none; auto is ddp with more than one process;
- batches: ``train.batch_size`` stays the global batch. Every rank draws the same seeded global batch (the one
  a single process draws) and trains on its contiguous slice of it; each rank's loss is scaled by its share of
  the batch, so the averaged gradient is the gradient of the global batch's mean loss, and the data position
  (epoch, step) means the same thing for any number of processes. Streamed data is the exception: each rank
  reads its own shards and its batches are already its share (:mod:`kiln.training.stream_plan`);
- writing: rank 0 alone writes run files, progress and metrics (:class:`QuietRunDir` on the others);
- evaluation: each rank evaluates its share of a split's batches and every rank gets the metrics of all of them
  (:mod:`kiln.training.dist_eval`), so early stopping and the best epoch are decided alike everywhere;
- checkpoints: DDP's are the single-process format written by rank 0; FSDP's model and optimizer state are
  saved sharded with ``torch.distributed.checkpoint`` (``checkpoints/last.dcp/step-<n>``) next to rank 0's
  safetensors checkpoint of the rest (schedule, random states, data position), and the finished run holds an
  ordinary consolidated ``model.safetensors`` (``get_model_state_dict(full_state_dict=True)``).

Why losses differ slightly from one process: each rank computes its matrix products on half the batch and
gloo/nccl sum the two gradients, so float32 sums are added in another order (about 1e-7 relative per step).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import ConfigError, KilnError, RunDirError
from kiln.rundir import RunDir
from kiln.training.dist_eval import Share

TIMEOUT_S = int(os.environ.get("KILN_DIST_TIMEOUT", "600"))  # a collective that waits longer fails
RDZV_TIMEOUT_S = int(os.environ.get("KILN_RDZV_TIMEOUT", "60"))  # a rendezvous endpoint that does not answer within this fails the launch
DCP_DIR = "checkpoints/last.dcp"


def is_writer() -> bool:
    """Whether this process writes run files: the only one, or rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


class Dist:
    """This process's place in the job and what ``train.parallel`` asks for."""

    def __init__(self, parallel: str = "none") -> None:
        self.world = world_size()
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.parallel = parallel if self.world > 1 else "none"
        if self.parallel == "auto":
            self.parallel = "ddp"
        self.backend = ""
        self.note = ""

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.parallel == "fsdp"

    # ---- the process group -----------------------------------------------------------------------

    def device(self, device: torch.device) -> torch.device:
        """Each worker on a GPU uses the one of its local rank."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def threads(self, threads: int, reason: str) -> tuple[int, str]:
        """Workers on one machine share its CPUs: auto's count divided among them."""
        if self.local_world > 1 and reason.startswith("auto"):
            return max(1, threads // self.local_world), f"{reason}, shared by {self.local_world} workers"
        return threads, reason

    def start(self, device: torch.device, requested: str) -> None:
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # a worker of torchrun's: it ends with its launcher
            die_with_parent(signal.SIGKILL, parent_is=("torch",))
        if not self.active:
            if requested in ("ddp", "fsdp"):
                self.note = f"train.parallel: {requested} with one process trains as one process (none)"
            return
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group(self.backend, timeout=timedelta(seconds=TIMEOUT_S), **self._store())
        self.note = (f"distributed: {self.world} processes, rank {self.rank}, backend {self.backend} "
                     f"({'CUDA' if device.type == 'cuda' else 'CPU'}), train.parallel {self.parallel}"
                     + (" (auto)" if requested == "auto" else ""))

    def _store(self) -> dict[str, Any]:
        """torchrun's key-value store under a prefix of its own for each restart: the store outlives a failed
        attempt, and gloo would otherwise read the addresses of the workers that died and be refused."""
        if "MASTER_ADDR" not in os.environ:
            return {}
        timeout = timedelta(seconds=TIMEOUT_S)
        hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world,
                              is_master=not hosted_by_agent and self.rank == 0, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return {"store": dist.PrefixStore(f"kiln/attempt-{attempt}", store), "rank": self.rank,
                "world_size": self.world}

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def finish(self, model: torch.nn.Module, fresh, run_dir: RunDir) -> torch.nn.Module:
        """After the run's files are written: under FSDP every rank reads the consolidated weights rank 0 wrote
        into a fresh (unsharded) model; then the process group ends."""
        dist.barrier()
        if self.fsdp:
            from safetensors.torch import load_file
            plain = fresh()
            plain.load_state_dict(load_file(str(run_dir.path / RunDir.WEIGHTS)), strict=True)
            model = plain
        self.stop()
        return model

    # ---- checks before anything is written ---------------------------------------------------------

    def check(self, t, samples: int) -> None:
        if not self.active:
            return
        if samples < self.world:
            raise ConfigError(f"--nproc: {self.world} processes but the training split has only {samples} samples; "
                              "use fewer processes or more data")
        if t.batch_size < self.world:
            raise ConfigError(f"train.batch_size: {t.batch_size} is the global batch and each of the {self.world} "
                              "processes takes a share of it; make it at least the number of processes")
        if t.hard_examples:
            raise ConfigError("train.hard_examples chooses samples by each one's last loss, which one process alone "
                              "sees; train it with one process (train.parallel: none)")

    def check_resume(self, run_dir: RunDir) -> None:
        """A run continues with the process count and parallelism it was started with."""
        manifest = run_dir.read_json(RunDir.MANIFEST) if run_dir.is_run() else {}
        was = manifest.get("distributed", {"processes": 1, "parallel": "none"})
        if (run_dir / RunDir.LAST).is_file() and (was["processes"], was["parallel"]) != (self.world, self.parallel):
            raise ConfigError(
                f"--resume: {run_dir.path} was trained by {was['processes']} process(es) with train.parallel "
                f"{was['parallel']}, and this start has {self.world} with {self.parallel}; its checkpoint holds "
                f"the state of that layout (sharded optimizer state, per-process random states), so resume it with "
                f"--nproc {was['processes']} (or start a new run)")

    def agree(self, values: list[float], what: str, device: torch.device) -> None:
        """Check that every rank holds the same ``values`` (decisions each rank takes alone, such as the best epoch
        and early stopping): they must, or the ranks would part ways (and wait on each other until the timeout)."""
        if not self.active:
            return
        local = torch.tensor(values, dtype=torch.float64, device=device).nan_to_num(nan=-1.5e308)
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"the processes disagree on {what}: rank {self.rank} has {values}, the ranks range "
                               f"from {low.tolist()} to {high.tolist()}")

    def eval_share(self, device: torch.device) -> Share:
        """This rank's part of an evaluation: every world-th batch (:mod:`kiln.training.dist_eval`)."""
        return Share(self.rank, self.world, device) if self.active else Share()

    def manifest(self) -> dict[str, Any]:
        return {"processes": self.world, "parallel": self.parallel, "backend": self.backend or None}

    # ---- the model ---------------------------------------------------------------------------------

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """What the training step calls: the model under DDP, the model sharded in place by FSDP2, or itself."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if self.parallel == "fsdp":
            shard_blocks(model)
        return model

    # ---- batches -----------------------------------------------------------------------------------

    def local(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [start, stop) of a global batch of n samples."""
        if not self.active:
            return 0, n
        bounds = [n * r // self.world for r in range(self.world + 1)]
        return bounds[self.rank], bounds[self.rank + 1]

    def global_counts(self, loss: torch.Tensor, correct: torch.Tensor, counted, mass=None, share: bool = True
                      ) -> tuple[torch.Tensor, ...]:
        """The batch's mean loss, right answers and counted (samples or tokens) over all ranks, and this rank's loss
        scale, which makes DDP's averaged gradient that of the whole batch's mean loss. ``mass``: what this rank's
        loss is a mean over (its counted, or with train.fairness its samples' summed weights); 0 on a rank without
        a share of the batch."""
        device = loss.device
        mass = counted if mass is None else mass
        local = torch.stack([torch.as_tensor(x, device=device).float()
                             for x in (loss.detach().float() * mass, correct, counted, mass)])
        if not share:
            local = torch.zeros_like(local)
        total = local.clone()
        dist.all_reduce(total)
        mean = total[0] / total[3].clamp(min=1e-12)
        return mean, total[1].long(), total[2].long(), local[3] * self.world / total[3].clamp(min=1e-12)


def shard_blocks(model: torch.nn.Module) -> None:
    """FSDP2: ``fully_shard`` each block (blocks that share a parameter, such as a tied lm_head and its token
    embedding, as one group), then the root. A block FSDP cannot shard is refused naming it."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(getattr(model, "blocks", []))
    parent = list(range(len(blocks)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            if p.dim() == 0:
                raise ConfigError(f"train.parallel: fsdp cannot shard model.blocks.{i} ({type(block).__name__}): its "
                                  "parameter is a single number (FSDP splits parameters along their first "
                                  "dimension); use train.parallel: ddp")
            if not p.is_floating_point():
                raise ConfigError(f"train.parallel: fsdp cannot shard model.blocks.{i} ({type(block).__name__}): it "
                                  f"has a {p.dtype} parameter; use train.parallel: ddp")
            first = owner.setdefault(id(p), i)
            parent[find(i)] = find(first)
    groups: dict[int, list[torch.nn.Module]] = {}
    for i, block in enumerate(blocks):
        if any(True for _ in block.parameters()):
            groups.setdefault(find(i), []).append(block)
    for i, members in sorted(groups.items()):
        try:
            fully_shard(members if len(members) > 1 else members[0])
        except Exception as e:  # FSDP's own reasons, named with the block
            raise ConfigError(f"train.parallel: fsdp cannot shard model.blocks.{i} ({type(members[0]).__name__}): "
                              f"{e}; use train.parallel: ddp") from None
    fully_shard(model)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict (plain tensors); under FSDP every rank must call it (it gathers)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def load_full_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> bool:
    """Load a whole state dict into a sharded model (each rank keeps its shard); False if not sharded."""
    if not is_sharded(model):
        return False
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    return True


# ---- FSDP checkpoints: torch.distributed.checkpoint ---------------------------------------------------

def save_sharded(run_dir: RunDir, model, optimizer, step: int) -> None:
    """Every rank writes its shards of model and optimizer state to checkpoints/last.dcp/step-<step>."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(run_dir.path / DCP_DIR / f"step-{step}"))
    dist.barrier()


def prune_sharded(run_dir: RunDir, step: int) -> None:
    """After rank 0's checkpoint names step `step`, older sharded states go (rank 0)."""
    folder = run_dir.path / DCP_DIR
    if is_writer() and folder.is_dir():
        for old in folder.iterdir():
            if old.name != f"step-{step}":
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_sharded(run_dir: RunDir, model, optimizer, step: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = run_dir.path / DCP_DIR / f"step-{step}"
    if not path.is_dir():
        raise RunDirError(f"{path} is missing: the run's checkpoint is at step {step} but its sharded model state "
                          "is not there (all machines must see the same run directory)")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


# ---- quiet ranks -----------------------------------------------------------------------------------

class QuietRunDir(RunDir):
    """The run directory as ranks other than 0 see it: read like rank 0, write nothing."""

    def check_new(self) -> None:
        pass  # rank 0 checks (and fails the job)

    def create(self) -> None:
        pass

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        pass

    def append_metrics(self, record: dict[str, Any]) -> None:
        pass

    def remove_leftovers(self) -> list[Path]:
        return []

    def clear_metrics(self) -> None:
        pass

    def keep_metrics_until(self, step: int) -> None:
        pass


class QuietProgress:
    """Progress as ranks other than 0 show it: nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


def restarted() -> bool:
    """Whether torchrun restarted this worker after a failure (``--max-restarts``): it then resumes."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


# ---- the launcher ----------------------------------------------------------------------------------

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(sig: int, parent: int | None = None, parent_is: tuple[str, ...] = ()) -> None:
    """Linux: the kernel sends this process ``sig`` when its parent exits (``prctl(PR_SET_PDEATHSIG)``), so that a
    SIGKILLed launcher leaves no workers training on, unseen, in the run directory. A parent already gone (not
    ``parent``'s pid, or its command line naming none of ``parent_is``) is the same signal now. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    ppid = os.getppid()
    gone = parent is not None and ppid != parent
    if parent_is:
        try:
            cmdline = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            cmdline = ""
        gone = gone or not any(name in cmdline for name in parent_is)
    if gone:
        os.kill(os.getpid(), sig)


def launch(worker_args: list[str], nproc: int, nnodes: int = 1, node_rank: int | None = None,
           endpoint: str | None = None, max_restarts: int = 0) -> int:
    """Start ``kiln train`` in ``nproc`` workers on this machine through torchrun; with ``nnodes`` > 1 this is
    one machine of several, meeting at the rendezvous ``endpoint`` (host:port of node 0). Returns torchrun's
    exit code; a failed job whose workers said why (a line ``error: ...``, such as a config refused before training)
    raises that reason, the first one, rather than a generic failure (and never a hint to resume a run that a
    refused config did not start)."""
    if nproc < 1:
        raise ConfigError(f"--nproc: {nproc}; give the number of worker processes on this machine (1 or more)")
    if nnodes < 1:
        raise ConfigError(f"--nnodes: {nnodes}; give the number of machines (1 or more)")
    if nnodes > 1 and not endpoint:
        raise ConfigError("--nnodes: several machines meet at a rendezvous endpoint: give --rdzv-endpoint HOST:PORT "
                          "(node 0's address and a free port) and --node-rank on each machine")
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts: {max_restarts}; give 0 or more")
    cmd = [sys.executable, "-m", "kiln.training.torchrun", "--nproc-per-node", str(nproc),
           "--max-restarts", str(max_restarts)]
    if endpoint:
        host, _, port = endpoint.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--rdzv-endpoint: {endpoint!r}; give HOST:PORT, e.g. 10.0.0.1:29500")
        if node_rank is None and nnodes > 1:
            raise ConfigError("--node-rank: each machine needs its number (0 on the machine at --rdzv-endpoint)")
        cmd += ["--nnodes", str(nnodes), "--node-rank", str(node_rank or 0), "--master-addr", host,
                "--master-port", port, "--rdzv-conf", f"timeout={RDZV_TIMEOUT_S},join_timeout={RDZV_TIMEOUT_S}"]
    else:
        cmd += ["--standalone"]
    cmd += ["-m", "kiln", "train", *worker_args]
    device = "CUDA (nccl)" if torch.cuda.is_available() else "CPU (gloo)"
    print(f"starting {nproc} worker(s) on this machine" + (f", node {node_rank or 0} of {nnodes}" if nnodes > 1 else "")
          + f" through torchrun, {device}", file=sys.stderr, flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                      os.environ.get("PYTHONPATH")]))}
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if "TORCH_CPP_LOG_LEVEL" not in env:  # torchrun's own process only (kiln.training.torchrun)
        env |= {"TORCH_CPP_LOG_LEVEL": "FATAL", "KILN_TORCHRUN_QUIET": "1"}
    unanswered, reason = False, None
    me = os.getpid()
    # torchrun ends (SIGTERM: it stops its workers first) when this process dies, even by SIGKILL; its workers end
    # with it (Dist.start): nothing trains on once the command is gone. (preexec_fn: this process runs no threads.)
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                          preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent=me)) as proc:  # noqa: PLW1509
        try:
            for line in proc.stderr:  # torchrun's and the workers' messages, passed on as they come
                sys.stderr.write(line)
                unanswered = unanswered or ("timed out" in line and "trying to connect" in line)
                if reason is None and line.startswith("error: "):
                    reason = line[len("error: "):].rstrip("\n")
            code = proc.wait()
        except KeyboardInterrupt:
            proc.wait()
            return 130
    if code and unanswered:
        raise ConfigError(f"--rdzv-endpoint: {endpoint} did not answer within {RDZV_TIMEOUT_S} s; start node 0 (the "
                          "machine at that address, --node-rank 0) first, check the address and port, and that no "
                          "firewall is in the way")
    if code and reason:
        raise WorkerError(reason)
    return code


class WorkerError(KilnError):
    """A worker of a distributed job stopped with an error of kiln's (its reason, as the worker printed it)."""
