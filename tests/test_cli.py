"""The ``kiln`` command through ``kiln.cli.main``: help texts, the summary table, and bad inputs that
exit 2 with one ``error:`` line on stderr, never a traceback. No test here trains a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kiln.cli import main

REPO = Path(__file__).resolve().parents[1]
SEED_PATH = REPO / "examples" / "mnist_seed.yaml"
SEED_BLOCKS = ["conv2d", "maxpool2d", "rows_to_sequence", "dense", "lstm", "transformer_encoder", "seq_pool",
               "classifier"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A wide terminal so rich never wraps a block name; a scratch cwd so nothing lands in the repo (runs/).
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2, (out, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} missing from stderr:\n{err}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


def write_seed_variant(path: Path, edit) -> Path:
    raw = yaml.safe_load(SEED_PATH.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fake_run_dir(folder: Path) -> Path:
    """What open_run_dir recognises as a run (config.yaml + manifest.json), without any training."""
    folder.mkdir()
    (folder / "config.yaml").write_text(SEED_PATH.read_text())
    (folder / "manifest.json").write_text(json.dumps({"status": "completed"}))
    return folder


# ---------------------------------------------------------------- help


def test_python_m_kiln_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "kiln", "--help"], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "evaluate", "predict", "summary"):
        assert command in proc.stdout
    assert "Traceback" not in proc.stderr


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kiln")
    for command in ("train", "evaluate", "predict", "summary"):
        assert command in out
    assert "examples:" in out and "KILN_DATA" in out


@pytest.mark.parametrize(
    ("command", "arguments"),
    [
        ("train", ["config", "--set", "KEY=VALUE", "--out", "--resume", "--json"]),
        ("evaluate", ["run", "--split", "{test,val,train}", "--json"]),
        ("predict", ["run", "files", "--json"]),
        ("summary", ["target", "--set"]),
    ],
)
def test_subcommand_help(capsys: pytest.CaptureFixture[str], command: str, arguments: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kiln {command}")
    for argument in arguments:
        assert argument in out, f"{argument!r} missing from `kiln {command} --help`:\n{out}"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    import kiln

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"kiln {kiln.__version__}"


@pytest.mark.parametrize(
    "argv",
    [[], ["fly"], ["summary"], ["predict", "runs/x"], ["evaluate", "runs/x", "--split", "holdout"],
     ["train", "x.yaml", "--epochs", "3"]],
    ids=["no-command", "unknown-command", "summary-no-target", "predict-no-files", "bad-split", "unknown-option"],
)
def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: kiln" in err and "error:" in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- summary


def test_summary_of_the_seed_config(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "summary", str(SEED_PATH))
    assert code == 0, err
    for block in SEED_BLOCKS:
        assert block in out
    assert "71,268" in out  # total parameters of seed_hybrid (DESIGN.md)
    assert "sequence (13, 416)" in out and "vector (10,)" in out
    assert err == ""


def test_summary_with_set_changes_the_model(capsys: pytest.CaptureFixture[str]) -> None:
    from kiln.config import load_config
    from kiln.summary import model_of

    expected = sum(p.numel() for p in model_of(load_config(SEED_PATH, ["model.blocks.3.units=128"])).parameters())
    code, out, err = run_cli(capsys, "summary", str(SEED_PATH), "--set", "model.blocks.3.units=128")
    assert code == 0, err
    assert f"{expected:,}" in out
    assert "71,268" not in out
    assert "sequence (13, 128)" in out


def test_summary_of_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = fake_run_dir(tmp_path / "run")
    code, out, err = run_cli(capsys, "summary", str(run))
    assert code == 0, err
    assert "71,268" in out


# ---------------------------------------------------------------- bad inputs: exit 2, "error:", no traceback


def test_misspelt_config_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def misspell(raw: dict) -> None:
        raw["train"]["epoch"] = raw["train"].pop("epochs")

    path = write_seed_variant(tmp_path / "typo.yaml", misspell)
    for command in ("summary", "train"):
        code, out, err = run_cli(capsys, command, str(path))
        assert_user_error(code, out, err, str(path), "train.epoch", "did you mean 'epochs'")
    assert not (tmp_path / "runs").exists()


def test_misspelt_set_key(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "summary", str(SEED_PATH), "--set", "model.blocks.4.unit=8")
    assert_user_error(code, out, err, "model.blocks.4.unit", "did you mean 'units'")


@pytest.mark.parametrize(
    ("item", "fragment"),
    [("model.blocks.8.units=3", "not an index of a list of 8 items"), ("train.epochs", "expected dotted.key=value")],
    ids=["index-out-of-range", "no-equals"],
)
def test_bad_set(capsys: pytest.CaptureFixture[str], item: str, fragment: str) -> None:
    code, out, err = run_cli(capsys, "summary", str(SEED_PATH), "--set", item)
    assert_user_error(code, out, err, fragment)


def test_impossible_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_seed_variant(tmp_path / "heads.yaml", lambda r: r["model"]["blocks"][5].__setitem__("heads", 3))
    code, out, err = run_cli(capsys, "summary", str(path))
    assert_user_error(code, out, err, "model.blocks.5 (transformer_encoder)", "heads=3")


@pytest.mark.parametrize("command", ["summary", "train"])
def test_config_path_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    missing = tmp_path / "missing.yaml"
    code, out, err = run_cli(capsys, command, str(missing))
    assert_user_error(code, out, err, str(missing), "does not exist")
    assert out == ""


def test_evaluate_on_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("not a run")
    before = snapshot(tmp_path)
    code, out, err = run_cli(capsys, "evaluate", str(tmp_path))
    assert_user_error(code, out, err, str(tmp_path), "not a kiln run directory", "manifest.json")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_run_dir_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    missing = tmp_path / "runs" / "nothing"
    argv = [command, str(missing)] + (["digit.png"] if command == "predict" else [])
    code, out, err = run_cli(capsys, *argv)
    assert_user_error(code, out, err, str(missing), "not a directory")
    assert not missing.exists()


def test_train_resume_into_a_directory_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    before = snapshot(out_dir)
    code, out, err = run_cli(capsys, "train", str(SEED_PATH), "--out", str(out_dir), "--resume")
    assert_user_error(code, out, err, "--resume", "not a kiln run directory")
    assert snapshot(out_dir) == before


def test_train_with_an_impossible_model_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def flatten_before_lstm(raw: dict) -> None:
        raw["model"]["blocks"][2] = {"type": "flatten"}

    path = write_seed_variant(tmp_path / "tutorial.yaml", flatten_before_lstm)
    out_dir = tmp_path / "out"
    code, out, err = run_cli(capsys, "train", str(path), "--out", str(out_dir))
    assert_user_error(code, out, err, "model.blocks.4 (lstm)", "(64,)",
                      "rows_to_sequence")
    assert not out_dir.exists()


def test_train_into_an_out_dir_that_holds_files(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.bin").write_bytes(bytes(range(256)) * 4)
    (out_dir / "sub").mkdir()
    (out_dir / "sub" / "notes.txt").write_text("do not touch\n")
    before = snapshot(out_dir)
    mtimes = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")}
    code, out, err = run_cli(capsys, "train", str(SEED_PATH), "--out", str(out_dir),
                             "--set", "data.limit_train=256", "--set", "data.limit_test=64")
    assert_user_error(code, out, err, str(out_dir), "already holds files", "nothing was changed")
    assert snapshot(out_dir) == before
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*")} == mtimes
    assert not (tmp_path / "runs").exists()


def test_train_into_an_existing_run_without_resume(
    mnist_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = fake_run_dir(tmp_path / "run")
    before = snapshot(run)
    code, out, err = run_cli(capsys, "train", str(SEED_PATH), "--out", str(run),
                             "--set", "data.limit_train=256", "--set", "data.limit_test=64")
    assert_user_error(code, out, err, "already holds a kiln run", "--resume")
    assert snapshot(run) == before


def _buffered_env() -> dict[str, str]:
    """The environment without PYTHONUNBUFFERED, so that output sits in Python's buffers as it does for users."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_the_kiln_command_flushes_its_output_and_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`kiln` ends without the interpreter's teardown (os._exit): piped output must still arrive whole,
    the same as main() prints in-process, and the exit code must be main's."""
    env = _buffered_env()  # COLUMNS=200 from the _isolated fixture, as in-process
    config = str(SEED_PATH)
    assert main(["summary", config]) == 0
    expected = capsys.readouterr().out
    ok = subprocess.run([sys.executable, "-m", "kiln", "summary", config], capture_output=True,
                        text=True, timeout=120, cwd=REPO, env=env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == expected and "71,268" in expected
    bad = subprocess.run([sys.executable, "-m", "kiln", "summary", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr and "Traceback" not in bad.stderr


def test_kiln_train_output_arrives_whole_through_a_pipe(tmp_path: Path, mnist_root: Path) -> None:
    """`kiln train --json` prints with print() (block-buffered into a pipe) just before the fast exit."""
    proc = subprocess.run([sys.executable, "-m", "kiln", "train", str(SEED_PATH), "--set", "data.limit_train=64",
                           "--set", "data.limit_test=64", "--out", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=_buffered_env())
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads(proc.stdout)
    assert metrics["test"]["samples"] == 64 and (tmp_path / "run" / "results.json").is_file()
