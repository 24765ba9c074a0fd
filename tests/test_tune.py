"""kiln tune: the search space and its errors, real tunes on German credit, studies shared by processes (journal
file, SQLite, a real PostgreSQL server), a killed study resuming, and storages that cannot be reached."""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.errors import ConfigError

pytest.importorskip("optuna", reason="kiln tune needs Optuna: pip install 'kiln[tune]'")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "german_credit.yaml"
SPACE = REPO / "examples" / "german_credit_space.yaml"
pytestmark = pytest.mark.usefixtures("one_thread")
# Small, fast trials: a few epochs on one thread, few log lines.
QUICK = ["--set", "train.epochs=4", "--set", "train.threads=1", "--set", "train.log_every=1000"]
SMALL_SPACE = {"train.optimizer.lr": {"float": [1.0e-3, 1.0e-2], "log": True},
               "model.blocks.1.units": {"int": [8, 64]}}


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def kiln_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln", *args]


def load_study(storage, name: str = "german_credit"):
    import optuna

    if "://" not in str(storage):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage = JournalStorage(JournalFileBackend(str(storage)))
    return optuna.load_study(study_name=name, storage=storage)


def write_space(path: Path, space: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


# ---- the space -----------------------------------------------------------------------------------


def base_config() -> dict:
    from kiln.config import load_config

    return load_config(CONFIG).to_dict()


def check(space: dict) -> None:
    from kiln.tuning.space import check_space, read_space

    check_space(read_space(space), base_config())


def test_the_example_space_parses_and_fits_the_example_config() -> None:
    from kiln.tuning.space import check_space, read_space

    space = read_space(str(SPACE))
    check_space(space, base_config())
    warmup = next(p for p in space.params if p.key == "train.schedule.warmup")
    assert warmup.when == {"train.schedule.name": ("cosine",)}
    lr = next(p for p in space.params if p.key == "train.optimizer.lr")
    assert lr.kind == "float" and lr.log and lr.low == 3e-4


@pytest.mark.parametrize(("key", "nearest"), [
    ("train.optimiser.lr", "train.optimizer.lr"),
    ("model.blocks.1.unit", "model.blocks.1.units"),
    ("train.batchsize", "train.batch_size"),
    ("train.hard_examples.fractoin", "train.hard_examples.fraction"),  # a field of a section the config leaves unset
])
def test_a_key_the_config_lacks_names_the_nearest_one(key: str, nearest: str) -> None:
    with pytest.raises(ConfigError) as e:
        check({key: {"float": [0.1, 0.2]}})
    assert f"{key} is not a key of the config; the nearest one is {nearest!r}" in str(e.value)


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"train.optimizer.lr": {"float": [1.0e-4, 20.0]}}, "train.optimizer.lr: 20.0 is outside what the config allows"),
    ({"model.blocks.1.dropout": {"float": [0.0, 1.5]}}, "model.blocks.1.dropout: 1.5 is outside"),
    ({"model.blocks.1.units": {"int": [0, 64]}}, "model.blocks.1.units: 0 is outside"),
    ({"model.blocks.1.units": {"float": [8.0, 64.0]}}, "model.blocks.1.units: 8.0 is outside"),  # an integer key
    ({"train.schedule.name": {"choice": ["cosine", "cosin"]}}, "'cosin' is outside"),
])
def test_a_range_outside_the_allowed_values_is_refused(spec: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        check(spec)
    assert fragment in str(e.value)


@pytest.mark.parametrize(("spec", "fragment"), [
    ({"train.optimizer.lr": {"float": [0.0, 0.1], "log": True}}, "a log-scale range must be above 0"),
    ({"train.optimizer.lr": {"float": [0.1, 0.01]}}, "low (0.1) must be below high (0.01)"),
    ({"train.optimizer.lr": {"floot": [0.1, 0.2]}}, "give exactly one of float, int or choice"),
    ({"train.optimizer.lr": {"float": [0.01, 0.1], "lg": True}}, "unknown option 'lg'"),
    ({"model.blocks.1.units": {"int": [8, 64], "log": True, "step": 8}}, "give log or step, not both"),
    ({"train.schedule.warmup": {"float": [0.0, 0.2], "when": {"train.schedule.name": "cosine"}}},
     "not an earlier key of the space"),
    ({"train.schedule.name": {"choice": ["constant", "cosine"]},
      "train.schedule.warmup": {"float": [0.0, 0.2], "when": {"train.schedule.name": "onecycle"}}},
     "'onecycle' is not one of its choices"),
    ({"model.blocks": {"choice": [[1], [2]]}}, "choices must be plain values"),
])
def test_malformed_spaces_name_the_problem(spec: dict, fragment: str) -> None:
    from kiln.tuning.space import read_space

    with pytest.raises(ConfigError) as e:
        read_space(spec)
    assert fragment in str(e.value)


def test_conditional_keys_are_sampled_only_when_their_condition_holds() -> None:
    import optuna

    from kiln.tuning.space import read_space

    space = read_space({"train.schedule.name": {"choice": ["constant", "cosine"]},
                        "train.schedule.warmup": {"float": [0.0, 0.2], "when": {"train.schedule.name": "cosine"}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {"constant": 0, "cosine": 0}
    for _ in range(20):
        trial = study.ask()
        params = space.sample(trial)
        seen[params["train.schedule.name"]] += 1
        assert ("train.schedule.warmup" in params) == (params["train.schedule.name"] == "cosine")
        study.tell(trial, 0.0)
    assert min(seen.values()) > 0


def test_cli_space_error_exits_2_without_traceback(tmp_path: Path, capsys) -> None:
    space = write_space(tmp_path / "space.yaml", {"train.optimizer.lrate": {"float": [1.0e-3, 1.0e-2]}})
    assert main(["tune", str(CONFIG), "--space", str(space), "--trials", "2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer.lrate is not a key of the config; the nearest one is 'train.optimizer.lr'" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


# ---- the trainer's hook ----------------------------------------------------------------------------


def test_on_evaluation_sees_each_epoch_and_an_exception_from_it_stops_training(german_credit: Path,
                                                                                 tmp_path: Path) -> None:
    import kiln.api

    class Stop(Exception):
        pass

    seen = []

    def hook(record: dict) -> None:
        seen.append(record)
        if record["epoch"] == 2:
            raise Stop

    with pytest.raises(Stop):
        kiln.api.train(CONFIG, {"train.epochs": 6, "train.threads": 1}, out=tmp_path / "r", live=False,
                       on_evaluation=hook)
    assert [r["epoch"] for r in seen] == [1, 2]
    assert all(0.0 <= r["val_roc_auc"] <= 1.0 for r in seen)


# ---- real tunes ------------------------------------------------------------------------------------


def test_a_tiny_tune_on_german_credit_writes_a_runnable_best_config(german_credit: Path, tmp_path: Path,
                                                                      capsys) -> None:
    import kiln
    from kiln.config import load_config

    out = tmp_path / "tune"
    space = write_space(tmp_path / "space.yaml", {**SMALL_SPACE, "train.schedule.name": {"choice": ["constant",
                                                                                                    "cosine"]}})
    # Seeded: the sampler's draws (and so the best value) are the same on every machine.
    summary = kiln.tune(CONFIG, space, 4, out=out, seed=0, overrides={"train.epochs": 6, "train.threads": 1,
                                                                       "train.log_every": 1000})
    assert summary["trials"].get("complete", 0) + summary["trials"].get("pruned", 0) == 4
    best = summary["best"]
    assert summary["metric"] == "roc_auc" and summary["direction"] == "maximize"
    assert best["value"] > 0.7  # validation ROC-AUC of a working table model; a broken one scores near 0.5
    cfg = load_config(out / "best.yaml")
    assert cfg.train.optimizer.lr == best["params"]["train.optimizer.lr"]
    assert cfg.model.blocks[1].units == best["params"]["model.blocks.1.units"]
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and table[0].startswith("number,state,value")
    assert "| trial | state | roc_auc |" in (out / "trials.md").read_text()
    importances = json.loads((out / "importances.json").read_text())
    assert set(importances) <= set(SMALL_SPACE) | {"train.schedule.name"} or "error" in importances
    assert ET.fromstring((out / "history.svg").read_text()).tag.endswith("svg")
    # The best config trains again as it is, to the same validation score.
    run = kiln.train(out / "best.yaml", out=tmp_path / "again", live=False)
    assert run.metrics["val"]["roc_auc"] == pytest.approx(best["value"], abs=1e-6)
    # Running the same command again finds the study complete and trains nothing.
    again = kiln.tune(CONFIG, space, 4, out=out, seed=0, overrides={"train.epochs": 6, "train.threads": 1,
                                                                     "train.log_every": 1000})
    assert again["trials"] == summary["trials"]
    # The same study with another space is refused, not mixed.
    other = write_space(tmp_path / "other.yaml", SMALL_SPACE)
    with pytest.raises(ConfigError, match="was started with other settings"):
        kiln.tune(CONFIG, other, 4, out=out, overrides={"train.epochs": 6, "train.threads": 1,
                                                         "train.log_every": 1000})


def test_cross_validated_tune_scores_trials_by_their_fold_mean(german_credit: Path, tmp_path: Path) -> None:
    import kiln

    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    summary = kiln.tune(CONFIG, space, 2, folds=2, pruner="none", out=tmp_path / "cv", seed=0,
                        overrides={"train.epochs": 8, "train.threads": 1, "train.log_every": 1000})
    best = summary["best"]
    assert len(best["folds"]) == 2 and best["value"] == pytest.approx(sum(best["folds"]) / 2)
    assert best["value"] > 0.65, best  # chance is 0.5; the example reaches about 0.79
    assert (Path(best["run"]) / "fold_1" / "results.json").is_file()


@pytest.mark.slow  # two processes, each importing torch: about a minute here
def test_two_workers_share_one_sqlite_study_without_duplicates(german_credit: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    db = tmp_path / "study.db"
    # Trials long enough (20 epochs) that the second process, which takes seconds to start, gets some of them.
    r = subprocess.run(kiln_cmd("tune", str(CONFIG), "--space", str(space), "--trials", "8", "--workers", "2",
                                "--storage", f"sqlite:///{db}", "--pruner", "none", "--out", str(tmp_path / "o"),
                                "--set", "train.epochs=20", "--set", "train.threads=1", "--set",
                                "train.log_every=1000"), env=env(), capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr
    trials = load_study(f"sqlite:///{db}").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 8, [(t.number, t.state, t.user_attrs) for t in trials]
    assert len({t.number for t in complete}) == 8
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 8  # no point trained twice
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2  # both processes did some of them
    assert "[worker " in r.stderr


@pytest.mark.slow  # two processes, each importing torch: about a minute here
def test_two_commands_started_by_hand_share_the_journal_file(german_credit: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    cmd = kiln_cmd("tune", str(CONFIG), "--space", str(space), "--trials", "6", "--pruner", "none", "--out",
                   str(tmp_path / "o"), "--set", "train.epochs=20", "--set", "train.threads=1", "--set",
                   "train.log_every=1000")
    procs = [subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    trials = load_study(tmp_path / "o" / "study.journal").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and len({json.dumps(t.params, sort_keys=True) for t in complete}) == 6
    assert len({t.user_attrs["worker"]["pid"] for t in complete}) == 2
    # Nothing lost; a trial asked for by both at the very end is told "not needed" (surplus), never trained.
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")


@pytest.mark.slow  # two processes, each importing torch: about a minute here
def test_a_killed_study_resumes_to_its_total(german_credit: Path, tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    out = tmp_path / "o"
    cmd = kiln_cmd("tune", str(CONFIG), "--space", str(space), "--trials", "5", "--pruner", "none", "--out",
                   str(out), "--set", "train.epochs=12", "--set", "train.threads=1", "--set", "train.log_every=1000")
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = out / "study.journal"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if journal.is_file():
            trials = load_study(journal).trials
            # A trial that started under a second ago (one takes seconds): killed mid-training, not between trials.
            # Its parameters drawn already, so that the retry can be checked to train the same ones.
            young = [t for t in trials if t.state.name == "RUNNING" and t.params
                     and time.time() - t.datetime_start.timestamp() < 2]
            if sum(t.state.name == "COMPLETE" for t in trials) >= 2 and young:
                break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = load_study(journal).trials
    killed = [t.number for t in before if t.state.name == "RUNNING"]
    assert len(killed) == 1 and sum(t.state.name == "COMPLETE" for t in before) < 5
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert f"trial {killed[0]} was lost" in r.stderr
    trials = load_study(journal).trials
    assert sum(t.state.name == "COMPLETE" for t in trials) == 5
    lost = trials[killed[0]]
    assert lost.state.name == "FAIL" and "ended without finishing it" in lost.user_attrs["lost"]
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed[0]]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == lost.params
    assert "lost:" in (out / "trials.md").read_text()


# ---- storages --------------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["refusing", "silent"])
def test_an_unreachable_storage_is_a_quick_clear_error(german_credit: Path, tmp_path: Path, capsys,
                                                       server: str) -> None:
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'kiln[tune]'")
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        if server == "silent":  # accepts connections (the kernel completes them) and never says a word
            listener.listen(8)
        else:
            listener.close()  # nothing listens: refused at once
        url = f"postgresql+psycopg://kiln:s3cret@127.0.0.1:{port}/kiln"
        t0 = time.monotonic()
        assert main(["tune", str(CONFIG), "--space", str(space), "--trials", "2", "--storage", url,
                     "--out", str(tmp_path / "o")]) == 2
        seconds = time.monotonic() - t0
    assert seconds < 30  # the connect timeout is 5 s, not a hang
    err = capsys.readouterr().err
    assert "cannot open the study storage postgresql+psycopg://kiln:***@" in err
    assert "s3cret" not in err and "Traceback" not in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server from Debian's postgresql package on a loopback port, for this module's tests."""
    pytest.importorskip("psycopg", reason="the PostgreSQL driver: pip install 'kiln[tune]'")
    bins = [Path(shutil.which("initdb") or "/nonexistent").parent,
            *map(Path, sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True))]
    bindir = next((b for b in bins if (b / "initdb").is_file() and (b / "pg_ctl").is_file()), None)
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) absent: apt-get install postgresql (.ci/run does)")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            pg = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to start PostgreSQL as")
        as_user = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    if as_user:
        os.chown(folder, pg.pw_uid, pg.pw_gid)
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-t", "60",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60, check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow  # two processes, each importing torch: about a minute here
def test_two_workers_share_a_study_on_a_real_postgresql_server(postgres: str, german_credit: Path,
                                                               tmp_path: Path) -> None:
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    r = subprocess.run(kiln_cmd("tune", str(CONFIG), "--space", str(space), "--trials", "4", "--workers", "2",
                                "--storage", postgres, "--study", "pg_shared", "--pruner", "none",
                                "--out", str(tmp_path / "o"), *QUICK), env=env(), capture_output=True, text=True,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr
    trials = load_study(postgres, "pg_shared").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4 and len({t.number for t in complete}) == 4
    assert len({json.dumps(t.params, sort_keys=True) for t in complete}) == 4
    summary = json.loads((tmp_path / "o" / "tune.json").read_text())
    assert summary["storage"].startswith("postgresql+psycopg://postgres@127.0.0.1")
    assert summary["best"]["value"] == max(t.value for t in complete)


# ---- pruning -------------------------------------------------------------------------------------------


def test_fold_median_pruner_judges_the_mean_after_this_fold_not_the_best_step() -> None:
    import optuna

    from kiln.tuning import fold_median_pruner

    study = optuna.create_study(direction="maximize", pruner=fold_median_pruner(optuna)(n_startup_trials=3,
                                                                                         n_warmup_steps=1))
    for value in (0.78, 0.79, 0.80):
        t = study.ask()
        for step in range(3):
            t.report(value, step)
        study.tell(t, value)
    lucky_first_fold = study.ask()
    lucky_first_fold.report(0.95, 0)
    assert not lucky_first_fold.should_prune()  # fold 0 is before the warm-up ends
    lucky_first_fold.report(0.70, 1)
    assert lucky_first_fold.should_prune()  # Optuna's MedianPruner would keep it: its best step, 0.95, is high
    good = study.ask()
    good.report(0.80, 0)
    good.report(0.795, 1)
    assert not good.should_prune()


def test_a_pruned_trial_stops_after_the_epoch_its_pruner_judged(german_credit: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    import optuna

    import kiln
    import kiln.tuning

    # A pruner that stops every trial at its first epoch whose validation ROC-AUC is below 1.
    monkeypatch.setattr(kiln.tuning, "make_pruner", lambda op, name, folds: optuna.pruners.ThresholdPruner(lower=1.0))
    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    summary = kiln.tune(CONFIG, space, 2, out=tmp_path / "o", overrides={"train.epochs": 8, "train.threads": 1,
                                                                          "train.log_every": 1000})
    assert summary["trials"] == {"pruned": 2} and summary["best"] is None
    for t in load_study(tmp_path / "o" / "study.journal").trials:
        assert list(t.intermediate_values) == [1]  # reported epoch 1, then stopped
        metrics = (Path(t.user_attrs["run"]) / "metrics.jsonl").read_text()
        assert '"epoch": 1' in metrics and '"epoch": 2,' not in metrics
        manifest = json.loads((Path(t.user_attrs["run"]) / "manifest.json").read_text())
        assert manifest["status"] == "stopped" and manifest["error"].startswith("TrialPruned: ")
    assert "pruned at step 1" in (tmp_path / "o" / "trials.md").read_text()


def test_hyperband_pruner_runs_a_study_to_its_total(german_credit: Path, tmp_path: Path) -> None:
    import kiln

    space = write_space(tmp_path / "space.yaml", SMALL_SPACE)
    # Seeded: unseeded draws of lr near 1e-3 train 4 epochs to a validation ROC-AUC under 0.6 (CI, stop 24).
    summary = kiln.tune(CONFIG, space, 3, pruner="hyperband", out=tmp_path / "hb", seed=0,
                        overrides={"train.epochs": 4, "train.threads": 1, "train.log_every": 1000})
    assert sum(summary["trials"].values()) == 3 and set(summary["trials"]) <= {"complete", "pruned"}
    assert summary["pruner"] == "hyperband" and summary["best"]["value"] > 0.6
