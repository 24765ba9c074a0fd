"""The learning-rate finder: `kiln lr-find` sweeps, plots and suggests a rate inside the sweep without writing a run;
`train.optimizer.lr: auto` trains with the suggestion, exactly as if it had been given by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

import kiln
from kiln.cli import main
from kiln.training.lr_find import Sweep, centred_mean

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parent.parent
SEED = ROOT / "examples" / "mnist_seed.yaml"
TINY = {"data.limit_train": 2000, "data.limit_test": 500, "train.epochs": 1, "train.batch_size": 32,
        "train.threads": 1, "train.log_every": 1000}


def test_suggestions_on_a_known_curve():
    # A loss that falls fastest at lr 1e-3 (a tanh step in log10(lr)), is lowest at 1e-1 and then blows up.
    lrs = np.logspace(-7, 1, 200)
    x = np.log10(lrs)
    loss = 2.0 - np.tanh((x + 3) * 1.5) + np.where(x > -1, (x + 1) ** 2 * 5, 0.0)
    found = Sweep(1e-7, 10.0, 200, "min10", lrs=lrs.tolist(), losses=loss.tolist(), smoothed=loss.tolist())
    found.suggest()
    assert found.steepest == pytest.approx(1e-3, rel=0.15)
    low = lrs[int(np.argmin(loss))]
    assert found.min10 == pytest.approx(low / 10) and 0.05 < low < 0.2
    assert found.suggestion == found.min10
    assert centred_mean([1, 2, 3, 4, 5], 3) == [1.5, 2, 3, 4, 4.5]


def test_lr_find_suggests_a_rate_in_the_sweep_and_writes_only_its_plot(mnist_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "plots" / "seed.png"
    out.parent.mkdir()
    assert main(["lr-find", str(SEED), "--steps", "80", "--start", "1e-6", "--end", "1", "--out", str(out),
                 "--json", *[f"--set={k}={v}" for k, v in TINY.items()]]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 1e-6 <= result["suggestion"] <= 1 and math.isfinite(result["suggestion"])
    assert 1e-6 <= result["steepest"] <= 1 and result["method"] == "min10"
    assert len(result["lrs"]) == len(result["losses"]) == len(result["smoothed"]) >= 20
    assert result["lrs"][0] == pytest.approx(1e-6) and result["lrs"] == sorted(result["lrs"])
    # The loss falls somewhere in the sweep: its lowest smoothed value is well under the first.
    assert min(result["smoothed"]) < 0.9 * result["smoothed"][0]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (720, 440)
    assert json.loads(out.with_suffix(".json").read_text())["suggestion"] == result["suggestion"]
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["seed.json", "seed.png"]  # no run


def test_lr_auto_trains_with_the_suggestion_exactly_as_if_given(mnist_root, tmp_path):
    auto = kiln.train(SEED, {**TINY, "train.optimizer.lr": "auto"}, out=tmp_path / "auto", live=False)
    chosen = yaml.safe_load((auto.path / "config.yaml").read_text())["train"]["optimizer"]["lr"]
    sweep = json.loads((auto.path / "lr_find.json").read_text())
    assert isinstance(chosen, float) and chosen == sweep["suggestion"] == auto.manifest["lr_find"]["lr"]
    assert 1e-7 <= chosen <= 10
    assert (auto.path / "lr_find.png").is_file()
    assert auto.metrics["test"]["accuracy"] > 0.4  # 57 steps from scratch; chance is 0.1
    # The sweep leaves weights and random state as they were: the same rate given by hand trains the same model.
    manual = kiln.train(SEED, {**TINY, "train.optimizer.lr": chosen}, out=tmp_path / "manual", live=False)
    a, m = load_file(auto.path / "model.safetensors"), load_file(manual.path / "model.safetensors")
    assert all(np.array_equal(a[k].numpy(), m[k].numpy()) for k in a)
    # Resumed with `lr: auto` (one more epoch), a run keeps the rate it chose: no second sweep.
    resumed = kiln.train(SEED, {**TINY, "train.optimizer.lr": "auto", "train.epochs": 2}, out=tmp_path / "auto",
                         resume=True, live=False)
    assert resumed.config.train.optimizer.lr == chosen
    assert json.loads((auto.path / "lr_find.json").read_text()) == sweep


def test_bad_sweep_arguments_are_errors(capsys, tmp_path):
    for args, message in ((["--start", "0"], "0 < start < end"), (["--start", "1", "--end", "0.1"], "0 < start < end"),
                          (["--steps", "5"], "at least 20 steps"), (["--out", str(tmp_path / "x.svg")], "ending in .png"),
                          (["--out", str(tmp_path / "no" / "x.png")], "does not exist")):
        assert main(["lr-find", str(SEED), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err, (args, err)
    assert main(["lr-find", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_names_the_sweep_options(capsys):
    with pytest.raises(SystemExit) as info:
        main(["lr-find", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kiln lr-find") and all(a in out for a in ("--steps", "--start", "--end", "--out",
                                                                             "min10", "steepest"))
