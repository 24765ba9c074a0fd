"""One harness over every registered block: adding a block adds these tests for free."""

import pytest
import torch

from kiln.nn import build_model
from kiln.registry import BLOCKS
from kiln.training.checkpoint import load_weights, save_weights

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
    members = (model.blocks[0].members,) if model.ensemble else ()  # training: one output per ensemble member
    assert tuple(y.shape) == (4, *members, *model.output_shape), "inferred output shape must match the real one"
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
    assert tuple(expected.shape) == (4, *model.output_shape)
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


# ---- the Transformer stack -----------------------------------------------------------------------

def _names(name, fields, in_shape=None):
    return [n.removeprefix("blocks.0.") for n, _ in _build(name, fields, in_shape)[0].named_parameters()]


def _layer(prefix, cross=False, attention_first=False):
    attn = [f"{prefix}attn.{p}.{w}" for p in ("qkv", "proj") for w in ("weight", "bias")]
    norm1 = [f"{prefix}norm1.weight", f"{prefix}norm1.bias"]
    cross = [f"{prefix}cross.{p}.{w}" for p in ("q", "kv", "proj") for w in ("weight", "bias")] + \
        [f"{prefix}norm_cross.weight", f"{prefix}norm_cross.bias"] if cross else []
    rest = [f"{prefix}norm2.weight", f"{prefix}norm2.bias"] + \
        [f"{prefix}mlp.{p}.{w}" for p in ("up", "down") for w in ("weight", "bias")]
    return (attn + norm1 if attention_first else norm1 + attn) + cross + rest


def test_transformer_parameter_names_and_order_stay():
    """Run directories load weights by these names, and parameter order orders gradient clipping's sum and a
    checkpoint's optimizer state: changing either changes what older runs load or how they train."""
    assert _names("transformer_encoder", {"heads": 2, "ff": 12}) == _layer("", attention_first=True)
    assert _names("transformer_decoder", {"layers": 2, "heads": 2}) == \
        _layer("layers.0.") + _layer("layers.1.") + ["norm.weight", "norm.bias"]
    assert _names("encoder_decoder", {"heads": 2, "layers": 1, "source_steps": 5}) == \
        _layer("encoder.0.") + ["encoder_norm.weight", "encoder_norm.bias"] + _layer("decoder.0.", cross=True) + \
        ["decoder_norm.weight", "decoder_norm.bias"]


@pytest.mark.parametrize(("norm", "act"), [("post", "relu"), ("pre", "gelu")])
def test_transformer_encoder_computes_pytorchs_encoder_layer(norm, act):
    """The seed model's layer is the standard one: the same function as torch.nn.TransformerEncoderLayer."""
    torch.manual_seed(0)
    model, shape = _build("transformer_encoder", {"heads": 2, "ff": 24, "norm": norm, "activation": act}, (7, 10))
    ours = model.blocks[0]
    torch_layer = torch.nn.TransformerEncoderLayer(10, 2, 24, dropout=0.0, activation=act, batch_first=True,
                                                   norm_first=norm == "pre")
    with torch.no_grad():
        attn = torch_layer.self_attn
        attn.in_proj_weight.copy_(ours.attn.qkv.weight), attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        attn.out_proj.load_state_dict(ours.attn.proj.state_dict())
        torch_layer.linear1.load_state_dict(ours.mlp.up.state_dict())
        torch_layer.linear2.load_state_dict(ours.mlp.down.state_dict())
        torch_layer.norm1.load_state_dict(ours.norm1.state_dict())
        torch_layer.norm2.load_state_dict(ours.norm2.state_dict())
    x = torch.randn(5, *shape)
    torch.testing.assert_close(model(x), torch_layer(x), atol=1e-5, rtol=1e-5)


def test_stacks_start_from_gpt2_init_and_the_encoder_from_pytorchs():
    torch.manual_seed(0)
    layer = _build("transformer_decoder", {"layers": 8, "heads": 2}, (6, 64))[0].blocks[0].layers[0]
    assert abs(layer.attn.qkv.weight.std().item() - 0.02) < 0.002 and not layer.attn.qkv.bias.any()
    assert abs(layer.mlp.down.weight.std().item() - 0.02 / 4) < 0.0005  # residual projections: / sqrt(2 * 8 layers)
    encoder = _build("transformer_encoder", {"heads": 2, "ff": 128}, (6, 64))[0].blocks[0]
    assert encoder.attn.qkv.weight.abs().max().item() <= 1 / 8  # nn.Linear's uniform(-1/sqrt(fan_in), ...)
    assert encoder.attn.qkv.bias.abs().min().item() > 0
