"""One harness over every registered block: adding a block adds these tests for free."""

import pytest
import torch

from kiln.nn import build_model
from kiln.registry import BLOCKS
from kiln.train.checkpoint import load_weights, save_weights

# Variants beyond each block's own example, for fields that change the output's shape or path.
VARIANTS = {
    "lstm": [{"units": 4, "steps": "last"}, {"units": 4, "steps": "last", "bidirectional": True, "layers": 2}],
    "gru": [{"units": 4, "steps": "last", "layers": 2, "dropout": 0.2}],
    "rnn": [{"units": 3, "steps": "last"}],
    "transformer_encoder": [{"heads": 4, "ff": 8, "norm": "post", "dropout": 0.1, "activation": "gelu"}],
    "positional_encoding": [{"kind": "sinusoidal"}, {"kind": "learned", "max_steps": 20}],
    "seq_pool": [{"mode": "max"}, {"mode": "last"}],
    "conv2d": [{"filters": 3, "kernel": [3, 1], "padding": "same"}, {"filters": 2, "stride": 2, "padding": 1}],
    "maxpool2d": [{"size": 3, "stride": 1}],
    "batchnorm": [],
    "transformer_decoder": [{"heads": 4, "layers": 1, "ff": 8, "bias": False, "dropout": 0.1}],
    "encoder_decoder": [{"heads": 2, "layers": 1, "decoder_layers": 2, "bias": False, "source_steps": 3}],
}
CASES = [(name, dict(spec.example)) for name, spec in BLOCKS.items()]
CASES += [(name, fields) for name, variants in VARIANTS.items() for fields in variants]
BATCH_INPUT_SHAPES = {"batchnorm": [(3, 5, 5), (7, 4), (6,)]}


def _build(name, fields, in_shape=None):
    spec_cls = BLOCKS.get(name)
    spec = spec_cls(type=name, **fields)
    shape = in_shape or spec_cls.example_input
    return build_model([spec], shape), shape


def _cases():
    for name, fields in CASES:
        for shape in BATCH_INPUT_SHAPES.get(name, [None]):
            yield pytest.param(name, fields, shape, id=f"{name}-{fields}-{shape}")


@pytest.mark.parametrize(("name", "fields", "in_shape"), list(_cases()))
def test_block_contract(name, fields, in_shape, tmp_path):
    torch.manual_seed(0)
    model, shape = _build(name, fields, in_shape)
    tokens = BLOCKS.get(name).example_tokens
    x = torch.randint(0, tokens, (4, *shape)) if tokens else torch.randn(4, *shape, requires_grad=True)

    y = model(x)
    assert tuple(y.shape) == (4, *model.output_shape), "inferred output shape must match the real one"
    assert torch.isfinite(y).all()

    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} received an all-zero gradient"
    assert tokens or (x.grad is not None and torch.isfinite(x.grad).all())

    model.eval()
    with torch.no_grad():
        expected = model(x)
    save_weights(tmp_path / "w.safetensors", model)
    torch.manual_seed(1)
    fresh, _ = _build(name, fields, in_shape)
    load_weights(tmp_path / "w.safetensors", fresh)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected), "save and reload must give identical outputs"


def test_every_block_is_covered_and_documented():
    for name, spec in BLOCKS.items():
        assert spec.__doc__ and spec.__doc__.strip(), f"block {name} needs a docstring (shown in docs)"
        assert spec.model_fields["type"].default == name


def test_unknown_field_is_rejected_with_suggestion():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="did you mean 'units'"):
        BLOCKS.get("lstm")(type="lstm", unit=5)



def test_transformer_encoder_reads_weights_saved_under_its_old_names():
    """Runs written before the one Transformer stack named the encoder's feed-forward layers ff.0 and ff.3."""
    torch.manual_seed(0)
    model, shape = _build("transformer_encoder", {"heads": 2, "ff": 12})
    old = {k.replace(".mlp.up.", ".ff.0.").replace(".mlp.down.", ".ff.3."): v for k, v in model.state_dict().items()}
    assert "blocks.0.ff.3.weight" in old
    torch.manual_seed(1)
    fresh, _ = _build("transformer_encoder", {"heads": 2, "ff": 12})
    fresh.load_state_dict(old)  # strict: every key must be used
    x = torch.randn(3, *shape)
    assert torch.equal(fresh.eval()(x), model.eval()(x))
