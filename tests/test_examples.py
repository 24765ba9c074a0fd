"""Every shipped example config loads and builds; the seed model matches its plain-PyTorch twin."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.plain_seed import PlainSeedHybrid
from kiln.config import load_config
from kiln.data.kind import find_data, open_kind, resolve
from kiln.errors import DataError
from kiln.nn import build_model
from kiln.summary import model_of

EXAMPLES = sorted(p for p in Path(__file__).parent.parent.joinpath("examples").glob("*.yaml")
                  if not p.stem.endswith("_space"))  # search spaces of kiln tune (tests/test_tune.py checks them)


def found(path, root):
    try:
        return find_data(path, root, "data")
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
    data_path = getattr(cfg.data, "path", None)
    if data_path is not None and not found(data_path, cfg.data.root):
        pytest.skip(f"{path.name}: its data {data_path} is not found (the model's shape or vocabulary comes from it)")
    kind = open_kind(cfg.data, cfg.seed)
    model = build_model(resolve(cfg, kind).blocks, kind.input_shape)
    # in evaluation: an ensemble (ensemble_mlp) gives one output per member in training, their mean here
    out = model.eval()(kind.to_input(kind.random_inputs(2, torch.Generator().manual_seed(0))))
    assert out.shape == (2, *model.output_shape)
    if kind.class_names:  # a classifier ends with one logit per class of its data
        assert model.output_shape == (len(kind.class_names),)


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
