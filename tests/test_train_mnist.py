"""Real training on real MNIST (small and fast), then evaluate, reload and predict from the run directory."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kiln
from kiln.cli import main
from kiln.config import load_config

ROOT = Path(__file__).parent.parent
SEED_CONFIG = ROOT / "examples" / "mnist_seed.yaml"
QUICK = {"data.limit_train": 8000, "data.limit_test": 2000, "train.epochs": 2, "train.batch_size": 32,
         "train.optimizer.lr": 0.002, "train.schedule.name": "onecycle"}


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory):
    return kiln.train(SEED_CONFIG, QUICK, out=tmp_path_factory.mktemp("runs") / "seed", live=False)


def test_training_reaches_real_accuracy(trained):
    # 7,200 training images, 2 epochs: a working model gets well above 90%; a broken one near 10%.
    assert trained.metrics["test"]["accuracy"] >= 0.90
    assert trained.metrics["test"]["samples"] == 2000
    epochs = [r for r in trained.dir.read_metrics() if r["kind"] == "epoch"]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]


def test_run_directory_is_complete_and_retrainable(trained):
    manifest = trained.manifest
    assert manifest["status"] == "completed"
    assert manifest["torch"] == torch.__version__ and manifest["seed"] == 0
    assert manifest["parameters"] == 71_268
    assert set(manifest["data_checksums"]) == {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                                               "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    saved = load_config(trained.path / "config.yaml")
    assert saved == load_config(SEED_CONFIG, QUICK).model_copy(update={"name": saved.name})
    for name in ("model.safetensors", "checkpoints/last.safetensors", "checkpoints/best.safetensors",
                 "results.json", "metrics.jsonl"):
        assert (trained.path / name).is_file(), name
    assert not list(trained.path.rglob("*.tmp")), "no temporary files may be left behind"


def test_reload_gives_identical_outputs_and_metrics(trained):
    images = torch.randint(0, 256, (16, 1, 28, 28), dtype=torch.uint8)
    loaded = kiln.Run.load(trained.path)
    assert torch.equal(loaded.predict(images), trained.predict(images))
    assert loaded.evaluate("test") == trained.metrics["test"]


def _save_test_pngs(directory: Path, count: int) -> tuple[list[Path], list[int]]:
    from kiln.data.mnist import load_mnist

    data = load_mnist()
    paths, labels = [], []
    for i in range(count):
        path = directory / f"digit_{i}.png"
        Image.fromarray(data.test_images[i].numpy()).save(path)
        paths.append(path)
        labels.append(int(data.test_labels[i]))
    return paths, labels


def test_predict_on_saved_pngs(trained, tmp_path, capsys):
    paths, labels = _save_test_pngs(tmp_path, 20)
    # A scanned-looking variant: dark digit on a light background, larger, in colour.
    first = np.asarray(Image.open(paths[0]))
    Image.fromarray(255 - first).resize((84, 84)).convert("RGB").save(tmp_path / "inverted.jpg", quality=95)
    np.save(tmp_path / "digit.npy", first.astype(np.float32) / 255)

    files = [str(p) for p in paths] + [str(tmp_path / "inverted.jpg"), str(tmp_path / "digit.npy")]
    assert main(["predict", str(trained.path), *files, "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    predicted = [int(r["class"]) for r in results]
    assert sum(p == y for p, y in zip(predicted, labels, strict=False)) >= 18
    assert predicted[20] == predicted[0] and predicted[21] == predicted[0]
    for r in results:
        assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4

    assert main(["predict", str(trained.path), str(paths[0])]) == 0
    assert f"{predicted[0]} (" in capsys.readouterr().out


def test_predict_rejects_a_file_that_is_not_an_image(trained, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    assert main(["predict", str(trained.path), str(bad)]) == 2
    err = capsys.readouterr().err
    assert "notes.png" in err and "not a readable image" in err and "Traceback" not in err


def test_evaluate_cli_matches_results(trained, capsys):
    assert main(["evaluate", str(trained.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == trained.metrics["test"]["accuracy"]


TINY = {"data.limit_train": 600, "data.limit_test": 200, "train.batch_size": 50}


def test_early_stopping_restores_best_epoch(mnist_root, tmp_path):
    overrides = {**TINY, "train.epochs": 6,
                 "train.early_stopping": {"monitor": "val_loss", "patience": 1, "min_delta": 10.0}}
    run = kiln.train(SEED_CONFIG, overrides, out=tmp_path / "es", live=False)
    # No change can beat the first epoch's loss by 10: one more epoch, then stop.
    assert run.metrics["epochs"] == 2 and run.metrics["stopped_early"] and run.metrics["best_epoch"] == 1
    best = load_file(str(run.path / "checkpoints" / "best.safetensors"))
    final = load_file(str(run.path / "model.safetensors"))
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_hard_examples_train_later_epochs_on_the_highest_losses(mnist_root, tmp_path):
    def epochs(select):
        overrides = {**TINY, "data.limit_train": 3000, "train.epochs": 3, "train.optimizer.lr": 0.006,
                     "train.schedule.name": "onecycle", "train.hard_examples": {"fraction": 0.2, "select": select}}
        run = kiln.train(SEED_CONFIG, overrides, out=tmp_path / select, live=False)
        return [r for r in run.dir.read_metrics() if r["kind"] == "epoch"]

    hardest, random = epochs("hardest"), epochs("random")
    # 2,700 training samples: all of them in epoch 1, then 540 per epoch (11 steps of 50 instead of 54)
    assert [r["samples"] for r in hardest] == [2700, 540, 540]
    assert [r["step"] for r in hardest] == [54, 65, 76]
    assert hardest[-1]["lr"] == pytest.approx(0.0, abs=1e-12), "the schedule must end with the shortened training"
    # Epoch 1 is the same in both runs; then the samples with the highest losses are harder than a random draw.
    assert hardest[0] == random[0]
    assert hardest[1]["train_loss"] > 1.2 * random[1]["train_loss"]
    assert hardest[1]["train_accuracy"] < random[1]["train_accuracy"]
    # Without a validation split, no epoch is "best": train metrics of different epochs cover different samples.
    no_val = kiln.train(SEED_CONFIG, {**TINY, "data.val_fraction": 0.0, "train.epochs": 2,
                                      "train.hard_examples": {"fraction": 0.5}}, out=tmp_path / "no_val", live=False)
    assert no_val.metrics["best_epoch"] is None and not (no_val.path / "checkpoints" / "best.safetensors").exists()
    with pytest.raises(kiln.ConfigError, match="train.early_stopping.monitor: train_loss is measured on the hard"):
        kiln.train(SEED_CONFIG, {**TINY, "train.hard_examples": {"fraction": 0.5},
                                 "train.early_stopping": {"monitor": "train_loss"}}, out=tmp_path / "es", live=False)
    assert not (tmp_path / "es").exists()


def test_same_seed_same_result_and_penalties_shrink_weights(mnist_root, tmp_path):
    a = kiln.train(SEED_CONFIG, TINY, out=tmp_path / "a", live=False)
    b = kiln.train(SEED_CONFIG, TINY, out=tmp_path / "b", live=False)
    wa, wb = load_file(str(a.path / "model.safetensors")), load_file(str(b.path / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "one seed must make a CPU run repeatable"
    # ...and the same bytes: a served model's version is the file's hash (the metadata once came in random order).
    digest = lambda run: hashlib.sha256((run.path / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)

    c = kiln.train(SEED_CONFIG, {**TINY, "train.l2": 0.05, "train.l1": 1e-4}, out=tmp_path / "c", live=False)
    wc = load_file(str(c.path / "model.safetensors"))
    norm = lambda w: sum(float(v.square().sum()) for k, v in w.items() if v.dim() > 1)  # noqa: E731
    assert norm(wc) < 0.8 * norm(wa)


def test_bf16_autocast_and_sgd_learn_on_cpu(mnist_root, tmp_path):
    run = kiln.train(SEED_CONFIG, {**TINY, "train.epochs": 3, "train.precision": "bf16",
                                   "train.optimizer.name": "sgd", "train.optimizer.lr": 0.05,
                                   "train.schedule.name": "cosine", "train.schedule.warmup": 0.1,
                                   "train.label_smoothing": 0.1},
                     out=tmp_path / "bf16", live=False)
    assert run.manifest["precision"] == "bf16"
    losses = [r["train_loss"] for r in run.dir.read_metrics() if r["kind"] == "epoch"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses
