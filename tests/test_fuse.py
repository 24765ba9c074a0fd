"""kiln.nn.fuse rewrites compute the same function with the same parameters and state-dict keys."""

import copy

import pytest
import torch

from kiln.nn import build_model
from kiln.nn.blocks.adapters import RowsToSequence
from kiln.nn.blocks.conv import Conv2d, MaxPool2d
from kiln.nn.fuse import ConvPool, fuse


def _pair(conv_fields, pool_fields=None, in_shape=(1, 28, 28)):
    torch.manual_seed(0)
    specs = [Conv2d(**{"filters": 8, **conv_fields}), MaxPool2d(**(pool_fields or {})), RowsToSequence()]
    plain = build_model(specs, in_shape)
    return plain, copy.deepcopy(plain)


def _assert_same_function(plain, fused, x, grad_atol):
    """Outputs and every parameter's gradient (for a random output gradient) match between the two models."""
    g = torch.randn(len(x), *plain.output_shape)
    (plain(x) * g).sum().backward()
    out = fused(x)
    (out * g).sum().backward()
    assert torch.allclose(plain(x), out, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=grad_atol), name


@pytest.mark.parametrize(("conv_fields", "pool_fields", "in_shape"), [
    ({"activation": "relu"}, {}, (1, 28, 28)),
    ({"activation": "none", "kernel": [3, 2]}, {"size": 3, "stride": 2}, (2, 15, 12)),
    ({"activation": "relu", "kernel": 5}, {}, (1, 17, 17)),  # odd conv output: the pool drops the edge
])
def test_fused_conv_pool_matches_plain(conv_fields, pool_fields, in_shape):
    plain, fused = _pair(conv_fields, pool_fields, in_shape)
    assert fuse(fused) and isinstance(fused.blocks[0], ConvPool)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    x = torch.rand(5, *in_shape)
    _assert_same_function(plain, fused, x, grad_atol=1e-4)


@pytest.mark.parametrize("conv_fields", [
    {"activation": "gelu"},
    {"stride": 2},
    {"padding": "same"},
    {"kernel": 7},  # 1 x 7 x 7 = 49 values per output: above MAX_PATCH, where the plain conv wins
])
def test_fuse_leaves_other_patterns_alone(conv_fields):
    _, fused = _pair(conv_fields)
    assert fuse(fused) == []
    assert not any(isinstance(b, ConvPool) for b in fused.blocks)


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """A process-fresh native loader that builds into an empty cache."""
    from kiln.nn import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setenv("KILN_CACHE", str(tmp_path))
    return native


@pytest.mark.parametrize(("conv_fields", "in_shape"), [
    ({"activation": "relu"}, (1, 28, 28)),
    ({"activation": "none", "kernel": [3, 2]}, (2, 11, 14)),
])
def test_native_kernel_matches_plain_blocks_with_ties(fresh_native, conv_fields, in_shape):
    plain, fused = _pair(conv_fields, {}, in_shape)
    fuse(fused)
    conv = fused.blocks[0].conv
    assert fresh_native.load(conv.in_channels, *conv.kernel_size, conv.out_channels, 2)[0] is not None
    x = (torch.rand(6, *in_shape) > 0.5).float()  # saturated 0/1 pixels: many equal window values (ties)
    _assert_same_function(plain, fused, x, grad_atol=1e-4)


def test_without_a_compiler_the_pytorch_path_runs(fresh_native, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with pytest.warns(RuntimeWarning, match="PyTorch operators run instead"):
        lib, how = fresh_native.load(1, 3, 3, 8, 2)
    assert lib is None and "native kernel unavailable" in how
    plain, fused = _pair({"activation": "relu"})
    fuse(fused)
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(plain(x), fused(x), atol=1e-5)


def test_tracing_takes_the_pytorch_operators(fresh_native):
    _, fused = _pair({"activation": "relu"})
    fuse(fused)
    fused.eval()
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        traced = torch.jit.trace(fused, x)  # would record nothing of a C call
        other = torch.rand(7, 1, 28, 28)
        assert torch.allclose(traced(other), fused(other), atol=1e-5)


def _encoder_pair(dropout=0.0, steps=13, heads=2):
    from kiln.nn.blocks.transformer import TransformerEncoder

    torch.manual_seed(0)
    plain = build_model([TransformerEncoder(heads=heads, ff=24, dropout=dropout)], (steps, 10))
    return plain, copy.deepcopy(plain)


@pytest.mark.parametrize(("steps", "heads"), [(13, 2), (5, 1), (9, 5)])
def test_native_attention_matches_plain_encoder(fresh_native, steps, heads):
    from kiln.nn.fuse import NativeSelfAttention
    from kiln.nn.native_attention import load

    plain, fused = _encoder_pair(steps=steps, heads=heads)
    assert any("attention" in line for line in fuse(fused))
    assert isinstance(fused.blocks[0].attn, NativeSelfAttention)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    assert load(steps, heads, 10 // heads)[0] is not None
    x = torch.randn(6, steps, 10) * 3  # peaked softmax rows as well as flat ones
    _assert_same_function(plain, fused, x, grad_atol=1e-5)


def test_native_attention_leaves_dropout_long_sequences_and_tracing_to_pytorch(fresh_native, monkeypatch):
    from kiln.nn import native_attention

    calls = []
    apply = native_attention.NativeAttention.apply
    monkeypatch.setattr(native_attention.NativeAttention, "apply", lambda *a: calls.append(a) or apply(*a))
    _, dropped = _encoder_pair(dropout=0.2)
    fuse(dropped)
    dropped(torch.randn(2, 13, 10))  # dropout in training: the kernel has none
    _, long = _encoder_pair(steps=native_attention.MAX_STEPS + 1)
    fuse(long)
    long(torch.randn(2, native_attention.MAX_STEPS + 1, 10))
    _, traced = _encoder_pair()
    fuse(traced)
    with torch.no_grad():
        graph = torch.jit.trace(traced.eval(), torch.randn(2, 13, 10), check_trace=False).inlined_graph
    assert calls == []
    assert "scaled_dot_product_attention" in str(graph)
    dropped.eval()(torch.randn(2, 13, 10))  # evaluation: no dropout, so the kernel runs
    assert len(calls) == 1


@pytest.mark.parametrize(("width", "heads"), [(50, 2), (13, 1), (8, 4)])
def test_native_add_norm_matches_plain_encoder(fresh_native, width, heads):
    from kiln.nn.blocks.transformer import TransformerEncoder
    from kiln.nn.fuse import NativeEncoderLayer

    torch.manual_seed(0)
    plain = build_model([TransformerEncoder(heads=heads, ff=2 * width)], (7, width))
    with torch.no_grad():  # a scale and shift that are not the identity, so that both are exercised
        for norm in (plain.blocks[0].norm1, plain.blocks[0].norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    fused = copy.deepcopy(plain)
    assert any("LayerNorm" in line for line in fuse(fused))
    assert isinstance(fused.blocks[0], NativeEncoderLayer)
    assert plain.state_dict().keys() == fused.state_dict().keys()
    x = torch.randn(11, 7, width) * 2  # 77 rows: not a multiple of the kernel's four
    _assert_same_function(plain, fused, x, grad_atol=1e-5)


def test_native_add_norm_leaves_pre_norm_dropout_and_tracing_to_pytorch(fresh_native, monkeypatch):
    from kiln.nn import native_norm
    from kiln.nn.blocks.transformer import TransformerEncoder

    calls = []
    apply = native_norm.AddNorm.apply
    monkeypatch.setattr(native_norm.AddNorm, "apply", lambda *a: calls.append(a) or apply(*a))
    pre = build_model([TransformerEncoder(heads=2, ff=8, norm="pre")], (5, 10))
    assert not any("LayerNorm" in line for line in fuse(pre))
    _, dropped = _encoder_pair(dropout=0.2)
    fuse(dropped)
    dropped(torch.randn(2, 13, 10))  # dropout in training: the kernel has none
    with torch.no_grad():
        graph = torch.jit.trace(dropped.eval(), torch.randn(2, 13, 10), check_trace=False).inlined_graph
    assert calls == [] and "layer_norm" in str(graph)
    dropped(torch.randn(2, 13, 10))  # evaluation: no dropout, so the kernel runs, once per half
    assert len(calls) == 2


def test_native_attention_and_add_norm_leave_the_transformer_stacks_alone():
    """The stacks' layers share the encoder's Attention and Layer, but only transformer_encoder layers get the
    kernels, as before: a loaded text run then computes what its training (never fused) measured."""
    from kiln.nn.blocks.language import LMHead, PositionalEncoding, TokenEmbedding
    from kiln.nn.blocks.transformer import Attention, EncoderDecoderSpec, Layer, TransformerDecoder

    for stack in (TransformerDecoder(heads=2, layers=2), EncoderDecoderSpec(heads=2, layers=1, source_steps=5)):
        model = build_model([TokenEmbedding(width=10, vocab=9), PositionalEncoding(), stack, LMHead(vocab=9)], (9,))
        assert fuse(model) == []
        assert {type(m) for m in model.modules() if isinstance(m, Attention | Layer)} == {Attention, Layer}


@pytest.mark.parametrize(("units", "steps"), [(50, "all"), (6, "last"), (16, "all")])
def test_native_lstm_matches_pytorch_lstm(fresh_native, units, steps):
    from kiln.nn.blocks.recurrent import LSTM
    from kiln.nn.fuse import NativeRecurrent
    from kiln.nn.native_lstm import load

    torch.manual_seed(0)
    plain = build_model([LSTM(units=units, steps=steps)], (9, 7))
    fused = copy.deepcopy(plain)
    assert any("LSTM" in line for line in fuse(fused))
    assert isinstance(fused.blocks[0], NativeRecurrent) and load(units)[0] is not None
    assert plain.state_dict().keys() == fused.state_dict().keys()
    x = torch.randn(5, 9, 7) * 2  # saturating gates as well as linear ones
    _assert_same_function(plain, fused, x, grad_atol=1e-5)


def test_native_lstm_leaves_stacked_and_bidirectional_lstms_alone():
    from kiln.nn.blocks.recurrent import LSTM

    for spec in (LSTM(units=4, layers=2), LSTM(units=4, bidirectional=True)):
        model = build_model([spec], (9, 7))
        assert not any("LSTM" in line for line in fuse(model))


def test_without_a_compiler_attention_and_lstm_take_pytorch(fresh_native, monkeypatch):
    from kiln.nn.blocks.recurrent import LSTM
    from kiln.nn.blocks.transformer import TransformerEncoder

    monkeypatch.setenv("CC", "/nonexistent/cc")
    torch.manual_seed(0)
    plain = build_model([LSTM(units=10), TransformerEncoder(heads=2, ff=8)], (9, 7))
    fused = copy.deepcopy(plain)
    fuse(fused)
    x = torch.randn(3, 9, 7)
    assert torch.allclose(plain(x), fused(x), atol=1e-6)
    assert not list(fresh_native.cache_dir().glob("*.so"))  # nothing was built
