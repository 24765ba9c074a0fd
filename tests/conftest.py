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
