"""A run killed with SIGKILL mid-epoch and resumed ends with the same weights as one never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import kiln

ROOT = Path(__file__).parent.parent


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "examples" / "mnist_seed.yaml").read_text())
    cfg["data"].update(limit_train=3000, limit_test=500)
    cfg["data"]["augment"] = {"shift": 0.1}  # its random stream must resume exactly too
    cfg["model"]["blocks"][5]["dropout"] = 0.1  # and dropout's
    # Epoch 2 trains on the half with the highest losses: their record must resume exactly as well.
    cfg["train"].update(epochs=2, batch_size=32, checkpoint_every=15, log_every=10,
                        schedule={"name": "onecycle"}, grad_clip=1.0, hard_examples={"fraction": 0.5},
                        threads=2)  # a set count: "auto" follows the machine's load, and sums differ by thread count
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _checkpoint_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["kiln"])["state"]["progress"]["global_step"]
    except Exception:
        return None


def _lm_config(tmp_path: Path) -> Path:
    """A tiny language model with dropout (its random stream must resume exactly) on a small corpus."""
    from test_text import CORPUS, lm_config

    (tmp_path / "corpus.txt").write_text(CORPUS)
    cfg = lm_config(tmp_path / "corpus.txt", steps=80, checkpoint_every=10, log_every=5, eval_every=20,
                    grad_clip=1.0, schedule={"name": "cosine", "warmup": 0.1}, threads=2)
    cfg["model"]["blocks"][2]["dropout"] = 0.1
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _kill_after_a_checkpoint(config: Path, out: Path) -> int:
    """`kiln train` in a subprocess, killed with SIGKILL as soon as its first checkpoint is on disk; its step."""
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", str(config), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    last = out / "checkpoints" / "last.safetensors"
    deadline = time.monotonic() + 120
    try:
        while _checkpoint_step(last) is None:
            assert proc.poll() is None, "training finished before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    return _checkpoint_step(last)


def _assert_same_run(resumed: kiln.Run, reference: kiln.Run, record_kind: str) -> None:
    ref_w = load_file(str(reference.path / "model.safetensors"))
    res_w = load_file(str(resumed.path / "model.safetensors"))
    assert ref_w.keys() == res_w.keys()
    for name in ref_w:
        assert (ref_w[name] == res_w[name]).all(), f"{name} differs after resume"
    assert resumed.metrics["test"] == reference.metrics["test"]
    records = [r for r in resumed.dir.read_metrics() if r["kind"] == record_kind]
    assert records == [r for r in reference.dir.read_metrics() if r["kind"] == record_kind]


def test_kill_mid_epoch_then_resume_matches_uninterrupted(mnist_root, tmp_path):
    config = _config(tmp_path)
    reference = kiln.train(config, out=tmp_path / "reference", live=False)
    step = _kill_after_a_checkpoint(config, tmp_path / "killed")
    epoch_steps = (85, 43)  # ceil(2700 / 32), then ceil(1350 / 32)
    assert 0 < step < sum(epoch_steps) and step != epoch_steps[0], "must resume from mid-epoch"
    resumed = kiln.train(config, out=tmp_path / "killed", resume=True, live=False)
    _assert_same_run(resumed, reference, "epoch")
    epochs = [r["epoch"] for r in resumed.dir.read_metrics() if r["kind"] == "epoch"]
    assert epochs == [1, 2], "metrics.jsonl must hold each epoch once"


def test_kill_a_language_model_then_resume_matches_uninterrupted(tmp_path):
    """Step-based training resumes the same way: the same batches, dropout and schedule after the kill."""
    config = _lm_config(tmp_path)
    reference = kiln.train(config, out=tmp_path / "reference", live=False)
    step = _kill_after_a_checkpoint(config, tmp_path / "killed")
    assert 0 < step < 80
    resumed = kiln.train(config, out=tmp_path / "killed", resume=True, live=False)
    _assert_same_run(resumed, reference, "eval")
    assert [r["step"] for r in resumed.dir.read_metrics() if r["kind"] == "eval"] == [0, 20, 40, 60, 80]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_beginning(mnist_root, tmp_path):
    """Once a dead end: --resume said start again, a fresh start said use --resume. Resuming now starts it over,
    and the temporary file of an interrupted checkpoint write is removed."""
    cfg = yaml.safe_load(_config(tmp_path).read_text())
    cfg["train"].update(epochs=1, checkpoint_every=10_000)  # no checkpoint before the end
    config = tmp_path / "late.yaml"
    config.write_text(yaml.safe_dump(cfg))
    reference = kiln.train(config, out=tmp_path / "reference", live=False)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kiln", "train", str(config), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    try:
        while not (killed / "manifest.json").is_file():  # written as training starts
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "checkpoints" / "last.safetensors").exists()
    leftover = killed / "checkpoints" / ".last.safetensors.x1y2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    resumed = kiln.train(config, out=killed, resume=True, live=False)
    assert not leftover.exists()
    _assert_same_run(resumed, reference, "epoch")


def test_resume_refuses_a_changed_config(mnist_root, tmp_path):
    config = _config(tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["train"].update(epochs=1)
    cfg["data"].update(limit_train=200, limit_test=100)
    config.write_text(yaml.safe_dump(cfg))
    kiln.train(config, out=tmp_path / "run", live=False)
    with pytest.raises(kiln.ConfigError, match="only train.epochs and train.steps may change"):
        kiln.train(config, {"train.batch_size": 16}, out=tmp_path / "run", resume=True, live=False)
