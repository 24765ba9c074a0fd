"""Where a study lives and who works on it: its storage, its creation, the trials a killed worker left behind.

- Storage: a journal file by default (``<out>/study.journal``; any number of processes on one machine append
  to it), or an RDB URL (``sqlite:///tune.db``, ``postgresql+psycopg://user:pw@host/db``) that several machines
  share. A server that cannot be reached is an error within :data:`CONNECT_TIMEOUT_S`, not a hang.
- Each running trial names its worker (host, process id and the process's start time) and refreshes a
  heartbeat every :data:`HEARTBEAT_S`. A worker starting or asking for a trial fails the trials that were left
  RUNNING by a process of this machine that no longer exists, or whose heartbeat stopped more than
  :data:`GRACE_S` ago (a worker elsewhere), and puts their parameters back in the queue: a killed study
  resumes where it stopped, and the lost trials are retried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kiln.errors import ConfigError, KilnError

CONNECT_TIMEOUT_S = 5  # an RDB server that does not answer within this is unreachable
HEARTBEAT_S = 15.0  # a running trial refreshes its heartbeat this often
GRACE_S = 120.0  # a running trial of another machine whose heartbeat is older than this is lost
JOURNAL = "study.journal"


def optuna():
    """Optuna, quiet (kiln prints its own lines), or an error naming the extra that installs it."""
    try:
        import optuna as _optuna
    except ModuleNotFoundError:
        raise KilnError("kiln tune needs Optuna: pip install 'kiln[tune]'") from None
    _optuna.logging.set_verbosity(_optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=_optuna.exceptions.ExperimentalWarning)
    return _optuna


def describe_storage(url: str | None, out: Path) -> str:
    """The storage as shown to people: a journal file's path, or the URL with its password hidden."""
    if url is None or "://" not in url:
        return f"journal file {Path(url) if url else out / JOURNAL}"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (a URL SQLAlchemy cannot parse is reported when it is opened)
        return url.split("@")[-1]


def open_storage(url: str | None, out: Path):
    """The Optuna storage ``url`` names: None -> the journal file in ``out``; a path -> that journal file;
    ``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql+pymysql://...`` -> an RDB storage."""
    op = optuna()
    if url is None or "://" not in url:
        path = Path(url) if url else out / JOURNAL
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(str(path)))
    shown = describe_storage(url, out)
    connect_args: dict[str, Any] = ({"timeout": 60} if url.startswith("sqlite") else  # seconds to wait for a lock
                                    {"connect_timeout": CONNECT_TIMEOUT_S})
    try:
        return op.storages.RDBStorage(url, engine_kwargs={"connect_args": connect_args, "pool_pre_ping": True})
    except ImportError as e:
        raise KilnError(f"storage {shown}: its database driver is not installed ({e}); for PostgreSQL, "
                        "pip install 'kiln[tune]' and use a postgresql+psycopg:// URL") from None
    except Exception as e:  # noqa: BLE001 (SQLAlchemy's errors for a bad URL, a refused or silent server, a bad password)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"cannot open the study storage {shown}: {first}") from None


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(storage, name: str, direction: str, settings: dict[str, Any], sampler, pruner, shown: str):
    """Create the study or load it; a study started with other settings (config, space, metric, folds) is an
    error rather than a mix of two searches. Two processes creating one study at once on a fresh database can
    collide (optuna#4621): the loser loads the winner's study."""
    op = optuna()
    for attempt in range(5):
        try:
            study = op.create_study(study_name=name, storage=storage, direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
            break
        except Exception:  # an IntegrityError or duplicate-study error of the race above
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    mine = fingerprint(settings)
    theirs = study.user_attrs.get("kiln_fingerprint")
    if theirs is None:
        study.set_user_attr("kiln_fingerprint", mine)
        study.set_user_attr("kiln_settings", json.loads(json.dumps(settings, default=str)))
    elif theirs != mine:
        old = study.user_attrs.get("kiln_settings", {})
        differ = [k for k in settings if json.dumps(settings[k], sort_keys=True, default=str)
                  != json.dumps(old.get(k), sort_keys=True, default=str)]
        what = ", ".join(differ) or "its settings"
        raise ConfigError(f"study {name!r} in {shown} was started with other settings ({what} differ); rerun with "
                          "the same ones to continue it, or name a new study with --study NAME (or another --out)")
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {name!r} in {shown} {study.direction.name.lower()}s its objective; this "
                          f"run would {direction} it")
    return study


# ---- workers, heartbeats and lost trials -------------------------------------------------------


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), to tell it from a later process with its number."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_id() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


def _alive(worker: dict[str, Any]) -> bool:
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    return worker.get("start") is None or _start_time(worker["pid"]) == worker["start"]


def lost_reason(trial, now: float, host: str) -> str | None:
    """Why a RUNNING trial has no worker any more, or None while it has one."""
    worker = trial.user_attrs.get("worker")
    if worker and worker.get("host") == host:
        return None if _alive(worker) else f"its worker (process {worker['pid']}) ended without finishing it"
    beat = trial.user_attrs.get("heartbeat")
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if beat is not None and now - beat > GRACE_S:
        where = f" on {worker['host']}" if worker else ""
        return f"its worker{where} sent no heartbeat for {now - beat:.0f} s"
    return None


def recover_lost(study) -> list[int]:
    """Fail the trials whose worker is gone and queue their parameters again; the numbers of those failed."""
    op = optuna()
    now, host, lost = time.time(), socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(op.trial.TrialState.RUNNING,)):
        reason = lost_reason(t, now, host)
        if reason is None:
            continue
        try:
            study._storage.set_trial_user_attr(t._trial_id, "lost", reason)
            study._storage.set_trial_state_values(t._trial_id, op.trial.TrialState.FAIL)
        except (op.exceptions.UpdateFinishedTrialError, RuntimeError, KeyError):
            continue  # another worker recovered it first, or it just finished
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        lost.append(t.number)
    return lost


@contextlib.contextmanager
def heartbeat(study, trial_id: int) -> Iterator[None]:
    """Refresh the trial's heartbeat every HEARTBEAT_S while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a lost connection: the next beat tries again
                study._storage.set_trial_user_attr(trial_id, "heartbeat", time.time())

    thread = threading.Thread(target=beat, name=f"kiln-tune-heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
