"""Shared fixtures. Data sets come from KILN_DATA (CI sets it to ../shared/data); tests that need one
skip with the reason when it is absent."""

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The directory holding the four MNIST .gz files: KILN_DATA itself or its mnist/ subfolder."""
    # Imported here, not at the top, so collecting tests that need no data does not import torch.
    from kiln.data.mnist import resolve_mnist_dir
    from kiln.errors import DataError

    if not os.environ.get("KILN_DATA"):
        pytest.skip(
            "MNIST unavailable: KILN_DATA is not set (point it at a directory with an mnist/ "
            "subfolder holding the four IDX .gz files, e.g. ../shared/data)"
        )
    try:
        return resolve_mnist_dir(None, download=False)  # with KILN_DATA set: only that is looked at
    except DataError as error:
        pytest.skip(f"MNIST unavailable: {error}")


@pytest.fixture(autouse=True)
def _auto_threads_ignore_load(monkeypatch):
    """`train.threads: auto` leaves out CPUs other processes keep busy, so two runs in one test could compute with
    different thread counts (and different float sums) when CI's machine is busy. In-process runs here see an
    idle machine; tests of the load rule patch it themselves, and subprocess runs set `threads` in their config."""
    from kiln.training import threads

    monkeypatch.setattr(threads, "other_runnable_threads", lambda: 0.0)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread (and much faster on a busy machine); other tests keep theirs.
    A test module that trains tiny models uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def german_credit() -> Path:
    root = os.environ.get("KILN_DATA")
    path = Path(root or ".") / "german_credit" / "german_credit.csv"
    if not root or not path.is_file():
        pytest.skip("German credit data unavailable: set KILN_DATA to a folder holding german_credit/german_credit.csv")
    return path
