"""Fashion-MNIST: grey photos of clothing read through MNIST's IDX path, with their own files, checksums and
class names."""

import os
import shutil
from pathlib import Path

import pytest

import kiln
from kiln.data.mnist import FASHION_MNIST, MNIST, load_mnist
from kiln.errors import DataError

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def fashion_root() -> Path:
    root = Path(os.environ.get("KILN_DATA", "/nonexistent")) / "fashion_mnist"
    if not (root / FASHION_MNIST.files["train_images"][0]).is_file():
        pytest.skip(f"Fashion-MNIST unavailable: {root} lacks its IDX files (set KILN_DATA)")
    return root


def test_its_files_are_verified_as_fashion_mnist_not_mnist(fashion_root, mnist_root, tmp_path):
    data = load_mnist(fashion_root, download=False, idx_set=FASHION_MNIST)
    assert tuple(data.train_images.shape) == (60_000, 28, 28) and len(data.test_labels) == 10_000
    assert data.checksums == dict(FASHION_MNIST.files.values())
    # MNIST's files where Fashion-MNIST's belong are refused by checksum, and the message names the set.
    for name, _ in MNIST.files.values():
        shutil.copy(mnist_root / name, tmp_path / name)
    with pytest.raises(DataError, match="fails its checksum.*not the standard Fashion-MNIST file"):
        load_mnist(tmp_path, download=False, idx_set=FASHION_MNIST)
    # A root without its subfolder names the folder to use.
    with pytest.raises(DataError, match=r"Fashion-MNIST files missing .*fashion_mnist/ subfolder"):
        load_mnist(tmp_path / "empty", download=False, idx_set=FASHION_MNIST)


def test_a_short_training_learns_clothes_and_answers_with_their_names(fashion_root, tmp_path):
    run = kiln.train(ROOT / "examples" / "fashion_mnist.yaml",
                     {"data.root": str(fashion_root), "data.limit_train": 6000, "data.limit_test": 1000,
                      "train.epochs": 2}, out=tmp_path / "run", live=False)
    assert run.metrics["test"]["accuracy"] > 0.72  # chance: 0.10
    assert run.kind.class_names[0] == "T-shirt/top" and run.kind.class_names[9] == "Ankle boot"
    data = load_mnist(fashion_root, download=False, idx_set=FASHION_MNIST)
    predicted = run.predict(data.test_images[:1000]).argmax(1)
    assert (predicted == data.test_labels[:1000]).float().mean() == pytest.approx(run.metrics["test"]["accuracy"])
    # `kiln predict` on an ordinary image file answers with the clothing's name.
    from PIL import Image

    first = int((predicted == data.test_labels[:1000]).nonzero()[0])  # a test image the model gets right
    Image.fromarray(data.test_images[first].numpy()).save(tmp_path / "item.png")
    record = run.predict_files([tmp_path / "item.png"])[0]
    assert record["class"] == run.kind.class_names[int(data.test_labels[first])]


@pytest.mark.slow
def test_the_example_reaches_90_percent(fashion_root, tmp_path):
    run = kiln.train(ROOT / "examples" / "fashion_mnist.yaml", {"data.root": str(fashion_root)},
                     out=tmp_path / "run", live=False)
    assert run.metrics["test"]["accuracy"] >= 0.90
