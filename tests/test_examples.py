"""Every shipped example config loads and builds; the seed model matches its plain-PyTorch twin."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.plain_seed import PlainSeedHybrid
from kiln.config import load_config
from kiln.data.text import TEXT_DATASETS, find_text
from kiln.errors import DataError
from kiln.summary import model_of

EXAMPLES = sorted(Path(__file__).parent.parent.joinpath("examples").glob("*.yaml"))


def find_text_or_none(path, root):
    try:
        return find_text(path, root)
    except DataError:
        return None


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_builds(path, tmp_path):
    cfg = load_config(path)
    generator = path.with_suffix(".py")
    if generator.is_file():  # an example that ships its data generator: make a small data set with it
        subprocess.run([sys.executable, str(generator), str(tmp_path / cfg.data.path), "--count", "300"],
                       check=True, capture_output=True)
        cfg = load_config(path, {"data.root": str(tmp_path)})
    if cfg.data.dataset == "tabular" and not (Path(os.environ.get("KILN_DATA", "/nonexistent")) / cfg.data.path).is_file():
        pytest.skip(f"{path.name}: its table {cfg.data.path} is not under $KILN_DATA (the model's shape comes from it)")
    if cfg.data.dataset in TEXT_DATASETS:
        if not find_text_or_none(cfg.data.path, cfg.data.root):
            pytest.skip(f"{path.name}: its text {cfg.data.path} is not found (the vocabulary comes from it)")
        model = model_of(cfg)
        out = model(torch.randint(0, 2, (2, *model.input_shape)))
        assert out.shape == (2, *model.output_shape)
        return
    model = model_of(cfg)
    out = model(torch.rand(2, *model.input_shape))
    assert out.shape == (2, *model.output_shape) and model.output_shape[0] in (2, 10)


def test_seed_model_matches_design_and_plain_pytorch():
    model = model_of(load_config(Path(__file__).parent.parent / "examples" / "mnist_seed.yaml"))
    kiln_params = sum(p.numel() for p in model.parameters())
    plain_params = sum(p.numel() for p in PlainSeedHybrid().parameters())
    assert abs(kiln_params - 71_268) <= 0.01 * 71_268
    assert kiln_params == plain_params
    assert [layer.out_shape for layer in model.layers] == [
        (32, 26, 26), (32, 13, 13), (13, 416), (13, 64), (13, 50), (13, 50), (50,), (10,)
    ]


def test_readme_documents_every_block_and_command():
    from kiln.registry import BLOCKS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for name in BLOCKS.names():
        assert f"`{name}`" in readme, f"README's block table lacks {name}"
    for command in ("kiln train", "kiln evaluate", "kiln predict", "kiln summary", "scripts/test.sh"):
        assert command in readme
